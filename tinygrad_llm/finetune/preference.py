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
import json

import numpy as np

from .. import backend, datasets
from .. import functional as F
from ..tensor import Tensor
from .instruct import RESPONSE_HEAD, check_instruction_data, format_input

PREFERENCE_KEYS = ("instruction", "chosen", "rejected")


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


# ---- data ------------------------------------------------------------------------------------


def load_preference_data(path=None, allow_identical=False):
    """The entries of a preference data file (default: the registry's `instruction-data-with-preference`), checked."""
    path = datasets.path("instruction-data-with-preference") if path is None else path
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"preference data file {path} is not valid JSON: {error}") from None
    return check_preference_data(data, source=path, allow_identical=allow_identical)


def check_preference_data(data, source="preference data", allow_identical=False):
    """`data` itself when every entry holds string "instruction", "chosen" and "rejected"; else a
    ValueError naming the first entry that does not.

    An entry whose chosen and rejected answers are the same text teaches nothing (its DPO
    loss is ln 2 whatever the weights) and is refused unless allow_identical=True. The
    book's own file has 6 (entries 122, 226, 400, 566, 628, 676, all in its training split);
    reproducing the book keeps them.
    """
    check_instruction_data(data, source=source, keys=PREFERENCE_KEYS)
    if not allow_identical:
        for i, entry in enumerate(data):
            if entry["chosen"] == entry["rejected"]:
                raise ValueError(f"{source}: entry {i} has the same text as chosen and rejected answer "
                                 f"({entry['chosen'][:40]!r}...): a preference needs two different answers "
                                 "(allow_identical=True keeps such entries, as the book does)")
    return data


class PreferenceDataset:
    """Each entry as token ids, the book's: item i is {"prompt", "chosen", "rejected"} lists of ids.

    prompt = format_input(entry); chosen and rejected are the prompt followed by
    "\\n\\n### Response:\\n" and that answer. Entries are checked (check_preference_data).
    """

    def __init__(self, data, tokenizer, allow_identical=False):
        self.data = check_preference_data(data, allow_identical=allow_identical)
        self.encoded_texts = []
        for entry in data:
            prompt = format_input(entry)
            self.encoded_texts.append({
                "prompt": tokenizer.encode(prompt),
                "chosen": tokenizer.encode(prompt + RESPONSE_HEAD + entry["chosen"]),
                "rejected": tokenizer.encode(prompt + RESPONSE_HEAD + entry["rejected"]),
            })

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(batch, pad_token_id=50256, allowed_max_length=None, mask_prompt_tokens=True, device="cpu"):
    """A batch of PreferenceDataset items -> the book's dict of arrays.

    "chosen" and "rejected" (B, T) int64 are padded with pad_token_id to one length, the
    longest of either + 1; "chosen_mask" and "rejected_mask" (B, T) bool are True on the
    real tokens, and with mask_prompt_tokens False on the prompt and the two newline tokens
    after it too, so they select the response ("### Response:\\n" and the answer). All four
    are cut to allowed_max_length; "prompt" is the list of the prompts' id arrays.
    """
    length = max(len(item[key]) + 1 for item in batch for key in ("chosen", "rejected"))
    out = {"prompt": [backend.to_device(np.asarray(item["prompt"], dtype=np.int64), device) for item in batch]}
    for key in ("chosen", "rejected"):
        ids = np.full((len(batch), length), pad_token_id, dtype=np.int64)
        mask = np.zeros((len(batch), length), dtype=bool)
        for row, item in enumerate(batch):
            ids[row, :len(item[key])] = item[key]
            start = len(item["prompt"]) + 2 if mask_prompt_tokens else 0
            mask[row, start:len(item[key])] = True
        out[key], out[f"{key}_mask"] = ids, mask
    for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        array = out[key] if allowed_max_length is None else out[key][:, :allowed_max_length]
        out[key] = backend.to_device(np.ascontiguousarray(array), device)
    return out
