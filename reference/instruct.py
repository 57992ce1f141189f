"""Chapter 7 in PyTorch, as the book writes it: the collate function and the training run the library's are checked against.

The book pads and masks one row at a time with torch ops (`torch.nonzero` over the pad
positions of the targets); tinygrad_llm.finetune.instruct does it for the whole batch with
a running count, so the two are independent ways to the same arrays.

The book trains with chapter 5's `train_model_simple`; `train_model_simple` here is that loop
over fixed lists of batches, with the gradient accumulation tinygrad_llm.train offers.
"""
import torch


def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, device="cpu",
                      mask_instruction=False):
    """The book's collate (section 7.3), and exercise 7.2's when items are (instruction_length, ids)."""
    items = [item for _, item in batch] if mask_instruction else batch
    batch_max_length = max(len(item) + 1 for item in items)
    inputs_lst, targets_lst = [], []
    for i, item in enumerate(items):
        extended = list(item) + [pad_token_id]
        padded = extended + [pad_token_id] * (batch_max_length - len(extended))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        pad_positions = torch.nonzero(targets == pad_token_id).squeeze(1)
        if pad_positions.numel() > 1:
            targets[pad_positions[1:]] = ignore_index
        if mask_instruction:
            instruction_length = batch[i][0]
            targets[:instruction_length - 1] = ignore_index
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst).to(device), torch.stack(targets_lst).to(device)


def calc_loss_batch(input_batch, target_batch, model):
    logits = model(input_batch)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(batches, model, num_batches):
    num_batches = min(num_batches, len(batches))
    return sum(calc_loss_batch(*batches[i], model).item() for i in range(num_batches)) / num_batches


def train_model_simple(model, train_batches, val_batches, optimizer, num_epochs, eval_freq, eval_iter,
                       accumulation_steps=1):
    """The book's chapter 5 loop: (train_losses, val_losses, tokens_seen) after every eval_freq-th step.

    With accumulation_steps = k a step adds up the gradients of k batches' losses / k (an
    epoch's last step those of the batches left, over their number).
    """
    train_losses, val_losses, track_tokens_seen = [], [], []
    tokens_seen, global_step = 0, -1
    for _ in range(num_epochs):
        model.train()
        for start in range(0, len(train_batches), accumulation_steps):
            micro_batches = train_batches[start:start + accumulation_steps]
            optimizer.zero_grad()
            for input_batch, target_batch in micro_batches:
                loss = calc_loss_batch(input_batch, target_batch, model)
                (loss / len(micro_batches)).backward()
                tokens_seen += input_batch.numel()
            optimizer.step()
            global_step += 1
            if global_step % eval_freq == 0:
                model.eval()
                with torch.no_grad():
                    train_losses.append(calc_loss_loader(train_batches, model, eval_iter))
                    val_losses.append(calc_loss_loader(val_batches, model, eval_iter))
                model.train()
                track_tokens_seen.append(tokens_seen)
    return train_losses, val_losses, track_tokens_seen
