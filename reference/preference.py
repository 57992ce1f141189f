"""The book's DPO functions (chapter 8 notebook) and a reward model's loss, in PyTorch.

Written as the book writes them: a log_softmax over the vocabulary, a gather, the mean over
the selected tokens. One change: a row that selects no token divides by 1, not 0, so it
gives 0 rather than NaN (tinygrad_llm's rule).
"""
import torch
import torch.nn.functional as F


def compute_logprobs(logits, labels, selection_mask=None, reduction="mean"):
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    log_probs = F.log_softmax(logits, dim=-1)
    if selection_mask is None:
        selected = torch.gather(log_probs, -1, labels.unsqueeze(-1)).squeeze(-1)
        return selected.sum(-1) if reduction == "sum" else selected.mean(-1)
    mask = selection_mask[:, 1:].clone().to(logits.dtype)
    # Unselected labels may be anything (a -100 pad): gather a valid id there, masked out below.
    labels = torch.where(mask > 0, labels, torch.zeros_like(labels))
    selected = torch.gather(log_probs, -1, labels.unsqueeze(-1)).squeeze(-1) * mask
    if reduction == "sum":
        return selected.sum(-1)
    return selected.sum(-1) / mask.sum(-1).clamp(min=1)


def compute_dpo_loss(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs,
                     reference_rejected_logprobs, beta=0.1):
    model_logratios = model_chosen_logprobs - model_rejected_logprobs
    reference_logratios = reference_chosen_logprobs - reference_rejected_logprobs
    logits = model_logratios - reference_logratios
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = (model_chosen_logprobs - reference_chosen_logprobs).detach()
    rejected_rewards = (model_rejected_logprobs - reference_rejected_logprobs).detach()
    return losses.mean(), chosen_rewards.mean(), rejected_rewards.mean()


def compute_dpo_loss_batch(batch, policy_model, reference_model, beta, reduction="mean"):
    """The book's loss of one batch; the reference runs without a graph."""
    def logprobs(model, key):
        return compute_logprobs(model(batch[key]), batch[key], batch[f"{key}_mask"], reduction)

    with torch.no_grad():
        reference_chosen, reference_rejected = logprobs(reference_model, "chosen"), logprobs(reference_model, "rejected")
    return compute_dpo_loss(logprobs(policy_model, "chosen"), logprobs(policy_model, "rejected"),
                            reference_chosen, reference_rejected, beta)


def reward_model_loss(chosen_rewards, rejected_rewards):
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def custom_collate_fn(batch, pad_token_id=50256, allowed_max_length=None, mask_prompt_tokens=True, device="cpu"):
    """The book's DPO collate: one padded length for chosen and rejected, masks over the responses."""
    batch_data = {"prompt": [], "chosen": [], "rejected": [], "rejected_mask": [], "chosen_mask": []}
    max_length_common = 0
    for key in ("chosen", "rejected"):
        max_length_common = max(max_length_common, max(len(item[key]) + 1 for item in batch))
    for item in batch:
        prompt = torch.tensor(item["prompt"])
        batch_data["prompt"].append(prompt)
        for key in ("chosen", "rejected"):
            sequence = item[key]
            padded = sequence + [pad_token_id] * (max_length_common - len(sequence))
            mask = torch.ones(len(padded)).bool()
            mask[len(sequence):] = False
            if mask_prompt_tokens:
                mask[:prompt.shape[0] + 2] = False
            batch_data[key].append(torch.tensor(padded))
            batch_data[f"{key}_mask"].append(mask)
    for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        stacked = torch.stack(batch_data[key])
        if allowed_max_length is not None:
            stacked = stacked[:, :allowed_max_length]
        batch_data[key] = stacked.to(device)
    return batch_data


def reward_scores(model, ids, mask):
    """A scalar-head GPT's output at the last True position of each row of `mask`."""
    positions = mask.shape[1] - 1 - torch.argmax(mask.flip(1).to(torch.int64), dim=1)
    return model(ids)[torch.arange(len(ids)), positions, 0]


def reward_model_loss_batch(batch, model):
    chosen = reward_scores(model, batch["chosen"], batch["chosen_mask"])
    rejected = reward_scores(model, batch["rejected"], batch["rejected_mask"])
    return reward_model_loss(chosen, rejected), chosen, rejected
