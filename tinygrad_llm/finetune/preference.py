"""Preference fine-tuning (the book's chapter 8 notebook on DPO, and a reward model).

A preference entry is an instruction with two answers, "chosen" and "rejected". DPO
(Rafailov et al. 2023) trains the policy to raise the log-probability of the chosen answer
relative to a frozen reference model, and to lower the rejected one's:

    loss = -log sigmoid(beta ((pi_c - pi_r) - (ref_c - ref_r)))

where pi_c is the policy's log-probability of the chosen response, ref_c the reference's.
The book takes the MEAN log-probability over the response tokens; the paper the sum
(`reduction="sum"`). A reward model instead scores prompt + response with one number and
learns the Bradley-Terry preference, -log sigmoid(r_chosen - r_rejected).
"""
import numpy as np

from .. import backend
from .. import functional as F
from ..tensor import Tensor


def _device_array(x, device):
    """A Tensor's, NumPy's or CuPy's array (or a list) as an array on `device`."""
    x = x.data if isinstance(x, Tensor) else x
    return backend.to_device(x if backend.device_of(x) == "cuda" else np.asarray(x), device)


def _tensor(x, like):
    """x as a Tensor beside `like` (a reference model's log-probabilities may come as arrays)."""
    return x if isinstance(x, Tensor) else Tensor(_device_array(x, like.device).astype(like.dtype, copy=False))


def compute_logprobs(logits, labels, selection_mask=None, reduction="mean"):
    """The log-probability of each sequence's tokens under `logits`: a Tensor (B,).

    logits (B, T, V) are the model's outputs on `labels` (B, T), so position t predicts
    label t + 1. selection_mask (B, T), True on the tokens that count (the response), is
    read at the predicted positions 1..T-1, as the book's. reduction="mean" (the book's) is
    the mean over the selected tokens, "sum" the DPO paper's total. A row that selects no
    token gets 0 and no gradient (the book's formula would divide 0 by 0).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' (the book's) or 'sum' (the DPO paper's), got {reduction!r}")
    if logits.ndim != 3:
        raise ValueError(f"compute_logprobs expects logits of shape (batch, tokens, vocab), got {logits.shape}")
    labels = _device_array(labels, logits.device)
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels of shape {labels.shape} do not match logits of shape {logits.shape}")
    xp = logits.xp
    batch, tokens = labels.shape
    if selection_mask is None:
        mask = xp.ones((batch, tokens - 1), logits.dtype)
    else:
        selection_mask = _device_array(selection_mask, logits.device)
        if selection_mask.shape != labels.shape:
            raise ValueError(f"selection_mask of shape {selection_mask.shape} does not match labels of shape "
                             f"{labels.shape}")
        mask = selection_mask[:, 1:].astype(logits.dtype)
    # Position t predicts label t + 1. The last position predicts nothing: it gets target 0
    # and no gradient, which costs less than cutting the (B, T, V) logits to (B, T - 1, V).
    # Unselected labels become 0 too, so a pad marked -100 is no out-of-range id.
    targets = xp.zeros_like(labels)
    targets[:, :-1] = xp.where(mask > 0, labels[:, 1:], 0)
    token_logprobs = F.token_log_probs(logits, targets)[:, :-1]  # (B, T - 1)
    total = (token_logprobs * mask).sum(axis=-1)
    if reduction == "sum":
        return total
    return total / xp.maximum(mask.sum(axis=-1), 1.0)


def compute_dpo_loss(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs,
                     reference_rejected_logprobs, beta=0.1):
    """The DPO loss of a batch, with the rewards the book logs: (loss, chosen_rewards, rejected_rewards).

    The inputs are (B,) log-probabilities (compute_logprobs); the reference's need no
    gradient. loss = mean of -log sigmoid(beta ((pc - pr) - (rc - rr))); the rewards are the
    batch means of pc - rc and pr - rr, without beta and without a graph, as the book's.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the book uses 0.1; 0.1 to 0.5 is typical), got {beta}")
    policy_chosen, policy_rejected = model_chosen_logprobs, _tensor(model_rejected_logprobs, model_chosen_logprobs)
    reference_chosen = _tensor(reference_chosen_logprobs, policy_chosen)
    reference_rejected = _tensor(reference_rejected_logprobs, policy_chosen)
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    loss = -F.log_sigmoid(logits * beta).mean()
    chosen_rewards = (policy_chosen.detach() - reference_chosen.detach()).mean()
    rejected_rewards = (policy_rejected.detach() - reference_rejected.detach()).mean()
    return loss, chosen_rewards, rejected_rewards


def reward_model_loss(chosen_rewards, rejected_rewards):
    """The pairwise (Bradley-Terry) loss of a reward model: mean of -log sigmoid(r_chosen - r_rejected)."""
    chosen_rewards = chosen_rewards if isinstance(chosen_rewards, Tensor) else _tensor(chosen_rewards, rejected_rewards)
    return -F.log_sigmoid(chosen_rewards - _tensor(rejected_rewards, chosen_rewards)).mean()
