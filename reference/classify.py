"""The book's chapter 6 in PyTorch: the twin tinygrad_llm.finetune.classify is checked against.

The surgery (freeze everything, a new 2-class head, unfreeze the last block and the final
norm), the loss and accuracy of the class logits, and `train_classifier_simple` with the
book's counting: global_step from -1, incremented after each optimizer step, an evaluation
when global_step % eval_freq == 0, examples_seen += the batch size, the accuracies after
each epoch. The loaders are lists of NumPy (inputs, targets) batches, so both libraries
see the same batches. `token` selects the position read ("last", "last-real", "mean"),
as the library's option of the same name.
"""
import torch

TRAINABLE = ("head", "last-block", "last-2", "all")


def prepare_classifier(model, head_state, trainable="last-block"):
    """Freeze every parameter, put in the 2-class head given as {"weight", "bias"}, unfreeze `trainable`."""
    for p in model.parameters():
        p.requires_grad = False
    weight = torch.as_tensor(head_state["weight"])
    model.out_head = torch.nn.Linear(weight.shape[1], weight.shape[0]).to(next(model.parameters()).dtype)
    with torch.no_grad():
        model.out_head.weight.copy_(weight)
        model.out_head.bias.copy_(torch.as_tensor(head_state["bias"]))
    blocks = list(model.trf_blocks)
    unfrozen = {"head": [], "last-block": [*blocks[-1:], model.final_norm],
                "last-2": [*blocks[-2:], model.final_norm], "all": [model]}[trainable]
    for module in unfrozen:
        for p in module.parameters():
            p.requires_grad = True
    return model


def class_logits(model, input_batch, token="last", pad_token_id=50256):
    logits = model(input_batch)
    if token == "last":
        return logits[:, -1, :]
    if token == "mean":
        return logits.mean(dim=1)
    last_real = ((input_batch != pad_token_id).sum(dim=1) - 1).clamp(min=0)  # the book's "flexible" position
    return logits[torch.arange(len(input_batch)), last_real, :]


def calc_loss_batch(input_batch, target_batch, model, device, token="last"):
    input_batch, target_batch = torch.as_tensor(input_batch, device=device), torch.as_tensor(target_batch, device=device)
    return torch.nn.functional.cross_entropy(class_logits(model, input_batch, token), target_batch)


def calc_loss_loader(data_loader, model, device, num_batches=None, token="last"):
    total_loss = 0.0
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        total_loss += calc_loss_batch(input_batch, target_batch, model, device, token).item()
    return total_loss / num_batches


def calc_accuracy_loader(data_loader, model, device, num_batches=None, token="last"):
    model.eval()
    correct_predictions, num_examples = 0, 0
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        with torch.no_grad():
            logits = class_logits(model, torch.as_tensor(input_batch, device=device), token)
        predicted_labels = torch.argmax(logits, dim=-1)
        num_examples += predicted_labels.shape[0]
        correct_predictions += (predicted_labels == torch.as_tensor(target_batch, device=device)).sum().item()
    return correct_predictions / num_examples


def evaluate_model(model, train_loader, val_loader, device, eval_iter, token="last"):
    model.eval()
    with torch.no_grad():
        train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter, token=token)
        val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter, token=token)
    model.train()
    return train_loss, val_loss


def train_classifier_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                            token="last"):
    train_losses, val_losses, train_accs, val_accs = [], [], [], []
    examples_seen, global_step = 0, -1
    for epoch in range(num_epochs):
        model.train()
        for input_batch, target_batch in train_loader:
            optimizer.zero_grad()
            loss = calc_loss_batch(input_batch, target_batch, model, device, token)
            loss.backward()
            optimizer.step()
            examples_seen += input_batch.shape[0]
            global_step += 1
            if global_step % eval_freq == 0:
                train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter, token)
                train_losses.append(train_loss)
                val_losses.append(val_loss)
        train_accs.append(calc_accuracy_loader(train_loader, model, device, num_batches=eval_iter, token=token))
        val_accs.append(calc_accuracy_loader(val_loader, model, device, num_batches=eval_iter, token=token))
    return train_losses, val_losses, train_accs, val_accs, examples_seen
