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
import copy
import json

import numpy as np

from .. import backend, datasets
from .. import functional as F
from ..checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from ..model import GPTModel
from ..nn import Linear
from ..tensor import Tensor, no_grad
from ..train import generate_and_print_sample, train
from .instruct import RESPONSE_HEAD, check_instruction_data, format_input

PREFERENCE_KEYS = ("instruction", "chosen", "rejected")


def _device_array(x, device):
    """A Tensor's, NumPy's or CuPy's array (or a list) as an array on `device`."""
    x = x.data if isinstance(x, Tensor) else x
    return backend.to_device(x if backend.device_of(x) == "cuda" else np.asarray(x), device)


def _tensor(x, like):
    """x as a Tensor beside `like` (a reference model's log-probabilities may come as arrays)."""
    return x if isinstance(x, Tensor) else Tensor(_device_array(x, like.device).astype(like.dtype, copy=False))


def _check_reduction(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' (the book's) or 'sum' (the DPO paper's), got {reduction!r}")


def compute_logprobs(logits, labels, selection_mask=None, reduction="mean"):
    """The log-probability of each sequence's tokens under `logits`: a Tensor (B,).

    logits (B, T, V) are the model's outputs on `labels` (B, T), so position t predicts
    label t + 1. selection_mask (B, T), True on the tokens that count (the response), is
    read at the predicted positions 1..T-1, as the book's. reduction="mean" (the book's) is
    the mean over the selected tokens, "sum" the DPO paper's total. A row that selects no
    token gets 0 and no gradient (the book's formula would divide 0 by 0).
    """
    _check_reduction(reduction)
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


# ---- DPO -------------------------------------------------------------------------------------


def make_reference_model(policy_model):
    """A frozen copy of the policy: same weights, eval mode, no parameter requires a gradient.

    Run under no_grad (as compute_dpo_loss_batch does), it records no graph; no optimizer
    holds its parameters, so it never changes.
    """
    reference_model = copy.deepcopy(policy_model)
    for p in reference_model.parameters():
        p.requires_grad, p.grad = False, None
    return reference_model.eval()


def _sequence_logprobs(model, labels, mask, reduction):
    """compute_logprobs(model(labels), labels, mask, reduction), with logits only at the
    positions that predict a selected label (position t predicts label t + 1): about a
    fifth of a book's batch, so the head's matmuls and the log-softmax shrink five-fold."""
    _check_reduction(reduction)
    labels = _device_array(labels, model.device)
    mask = _device_array(mask, model.device).astype(bool)
    xp = backend.xp_of(labels)
    predicts = xp.zeros_like(mask)
    predicts[:, :-1] = mask[:, 1:]  # (B, T)
    token_logprobs = F.token_log_probs(model(labels, logits_at=predicts), labels[:, 1:][mask[:, 1:]])  # (N,)
    # Row b's selected positions come in one run (row-major order): a (B, N) 0/1 matrix adds them up.
    rows = xp.nonzero(predicts)[0]
    sums = xp.arange(labels.shape[0])[:, None] == rows[None, :]
    total = Tensor(sums.astype(token_logprobs.dtype)) @ token_logprobs  # (B,)
    if reduction == "sum":
        return total
    return total / xp.maximum(mask[:, 1:].sum(axis=-1), 1).astype(token_logprobs.dtype)


def _pair_logprobs(model, batch, reduction):
    """(chosen, rejected) sequence log-probabilities (B,) each, from one forward pass over
    the 2B rows: the rows are independent, and one pass of twice the rows makes one
    embedding and one head gradient instead of two to add up."""
    chosen, rejected = batch["chosen"], batch["rejected"]
    if chosen.shape != rejected.shape:  # the collate pads both to one length; other batches may not
        return tuple(_sequence_logprobs(model, batch[key], batch[f"{key}_mask"], reduction)
                     for key in ("chosen", "rejected"))
    xp = backend.xp_of(chosen)
    both = _sequence_logprobs(model, xp.concatenate([chosen, rejected]),
                              xp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]), reduction)
    return both[:len(chosen)], both[len(chosen):]


def compute_dpo_loss_batch(batch, policy_model, reference_model, beta, reduction="mean"):
    """The book's DPO loss of one collated batch: (loss, chosen_rewards, rejected_rewards).

    The reference model runs under no_grad: it adds no graph and gets no gradient.
    """
    with no_grad():
        reference_chosen, reference_rejected = _pair_logprobs(reference_model, batch, reduction)
    return compute_dpo_loss(*_pair_logprobs(policy_model, batch, reduction), reference_chosen, reference_rejected,
                            beta)


def compute_dpo_loss_loader(data_loader, policy_model, reference_model, beta, num_batches=None, reduction="mean"):
    """The book's averages over the first `num_batches` batches (default all): (loss, chosen, rejected)
    rewards as floats; NaN for an empty loader."""
    if len(data_loader) == 0:
        return float("nan"), float("nan"), float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    totals = np.zeros(3)
    with no_grad():
        for i, batch in enumerate(data_loader):
            if i >= num_batches:
                break
            totals += [value.item() for value in
                       compute_dpo_loss_batch(batch, policy_model, reference_model, beta, reduction)]
    loss, chosen, rejected = totals / num_batches
    return float(loss), float(chosen), float(rejected)


def evaluate_dpo_loss_loader(policy_model, reference_model, train_loader, val_loader, beta, eval_iter,
                             reduction="mean"):
    """The book's evaluation: loss and rewards over `eval_iter` batches of each loader, policy in eval mode."""
    was_training = policy_model.training
    policy_model.eval()
    results = {}
    for split, loader in (("train", train_loader), ("val", val_loader)):
        loss, chosen, rejected = compute_dpo_loss_loader(loader, policy_model, reference_model, beta, eval_iter,
                                                         reduction)
        results.update({f"{split}_loss": loss, f"{split}_chosen_reward": chosen, f"{split}_rejected_reward": rejected})
    policy_model.train(was_training)
    return results


def train_model_dpo_simple(policy_model, reference_model, train_loader, val_loader, optimizer, num_epochs, beta,
                           eval_freq, eval_iter, start_context=None, tokenizer=None, reduction="mean", **options):
    """The book's DPO training, through train.train; returns the book's tracking dict.

    After step s with s % eval_freq == 0 (s from 0) the loss and rewards over `eval_iter`
    batches of each loader are recorded and printed with the reward margins (chosen -
    rejected); after each epoch a greedy continuation of `start_context` is printed. The
    tracking dict holds the lists "train_losses", "train_chosen_rewards",
    "train_rejected_rewards", the same for val, and "tokens_seen" (chosen tokens, as the
    book counts). `options` are train's keywords (checkpoint_path, metrics_path, grad_clip, ...).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the book uses 0.1; 0.1 to 0.5 is typical), got {beta}")

    def loss_fn(model, batch):
        return compute_dpo_loss_batch(batch, model, reference_model, beta, reduction)[0]

    def evaluate():
        return evaluate_dpo_loss_loader(policy_model, reference_model, train_loader, val_loader, beta, eval_iter,
                                        reduction)

    def epoch_end(epoch):
        if start_context is not None and tokenizer is not None:
            generate_and_print_sample(policy_model, tokenizer, None, start_context)

    def report(record):
        if record["event"] != "eval":
            return None
        return (f"Ep {record['epoch']} (Step {record['step']:06d}): "
                f"Train loss {record['train_loss']:.3f}, Val loss {record['val_loss']:.3f}, "
                f"Train reward margins {record['train_chosen_reward'] - record['train_rejected_reward']:.3f}, "
                f"Val reward margins {record['val_chosen_reward'] - record['val_rejected_reward']:.3f}")

    history = train(policy_model, optimizer, train_loader, loss_fn, num_epochs, evaluate=evaluate,
                    eval_freq=eval_freq, epoch_end=epoch_end, seen=lambda batch: int(np.size(batch["chosen"])),
                    report=report, **options)
    evals = [record for record in history if record["event"] == "eval"]
    tracking = {}
    for split in ("train", "val"):
        tracking[f"{split}_losses"] = [record[f"{split}_loss"] for record in evals]
        tracking[f"{split}_chosen_rewards"] = [record[f"{split}_chosen_reward"] for record in evals]
        tracking[f"{split}_rejected_rewards"] = [record[f"{split}_rejected_reward"] for record in evals]
    tracking["tokens_seen"] = [record["seen"] for record in evals]
    return tracking


# ---- the reward model ------------------------------------------------------------------------


def make_reward_model(model, seed=None):
    """A reward model from a GPT: a copy of it whose output head is one scalar, Linear(emb_dim, 1).

    The head is initialised as torch's Linear (seed=None: tl.manual_seed's generator) and
    has no bias, which would add the same number to both scores of a pair: the pairwise
    loss cannot see it. The backbone keeps the GPT's weights. reward_scores reads the head at each sequence's last
    real token, where the causal attention has seen all of prompt and response.
    """
    reward_model = copy.deepcopy(model)
    rng = backend.generator() if seed is None else np.random.default_rng(seed)
    reward_model.out_head = Linear(model.cfg["emb_dim"], 1, bias=False, dtype=model.dtype, rng=rng)
    return reward_model.to(device=model.device)


def last_token_positions(mask):
    """The index of the last True of each row of a (B, T) mask: the last real token of the response."""
    mask = np.asarray(backend.to_host(mask), dtype=bool)
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"row {int(empty[0])} of the batch has no response token to score (its mask is all "
                         "False: an empty answer, or one cut off by allowed_max_length)")
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)


def reward_scores(reward_model, ids, mask):
    """The reward model's score of each sequence (B,): its scalar output at the last position the mask selects."""
    out = reward_model(ids)  # (B, T, 1)
    if out.shape[-1] != 1:
        raise ValueError(f"reward_scores needs a model with a scalar head (make_reward_model), got outputs of "
                         f"width {out.shape[-1]}")
    positions = last_token_positions(mask)
    rows = np.arange(len(positions))
    return out[backend.to_device(rows, out.device), backend.to_device(positions, out.device), 0]


def calc_reward_loss_batch(batch, reward_model):
    """(loss, chosen scores, rejected scores) of one collated preference batch."""
    chosen = reward_scores(reward_model, batch["chosen"], batch["chosen_mask"])
    rejected = reward_scores(reward_model, batch["rejected"], batch["rejected_mask"])
    return reward_model_loss(chosen, rejected), chosen, rejected


def evaluate_reward_model(reward_model, data_loader, num_batches=None):
    """Loss, preference accuracy (the fraction of pairs with r_chosen > r_rejected) and mean margin
    over the first `num_batches` batches (default all), as floats; the model in eval mode."""
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if num_batches == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "margin": float("nan")}
    was_training = reward_model.training
    reward_model.eval()
    losses, margins = [], []
    with no_grad():
        for i, batch in enumerate(data_loader):
            if i >= num_batches:
                break
            loss, chosen, rejected = calc_reward_loss_batch(batch, reward_model)
            losses.append(loss.item())
            margins.append(backend.to_host((chosen - rejected).data))
    reward_model.train(was_training)
    margins = np.concatenate(margins)
    return {"loss": float(np.mean(losses)), "accuracy": float(np.mean(margins > 0)), "margin": float(margins.mean())}


def train_reward_model(reward_model, train_loader, val_loader, optimizer, num_epochs, eval_freq, eval_iter,
                       **options):
    """Train a reward model on preference batches through train.train; returns its records.

    Every eval_freq steps: loss, accuracy and margin over eval_iter batches of each loader
    ("train_loss", "val_accuracy", ...); after each epoch the accuracy over the whole
    validation loader ("val_accuracy_full"). `options` are train's keywords.
    """
    def loss_fn(model, batch):
        return calc_reward_loss_batch(batch, model)[0]

    def evaluate():
        metrics = {}
        for split, loader in (("train", train_loader), ("val", val_loader)):
            metrics.update({f"{split}_{key}": value
                            for key, value in evaluate_reward_model(reward_model, loader, eval_iter).items()})
        return metrics

    def epoch_end(epoch):
        return {"val_accuracy_full": evaluate_reward_model(reward_model, val_loader)["accuracy"]}

    def report(record):
        if record["event"] == "eval":
            return (f"Ep {record['epoch']} (Step {record['step']:06d}): Train loss {record['train_loss']:.3f}, "
                    f"Val loss {record['val_loss']:.3f}, Train acc {record['train_accuracy'] * 100:.1f}%, "
                    f"Val acc {record['val_accuracy'] * 100:.1f}%")
        return f"Ep {record['epoch']}: validation accuracy {record['val_accuracy_full'] * 100:.2f}%"

    return train(reward_model, optimizer, train_loader, loss_fn, num_epochs, evaluate=evaluate, eval_freq=eval_freq,
                 epoch_end=epoch_end, seen=lambda batch: len(batch["chosen"]), report=report, **options)


def save_reward_model(path, reward_model, **metadata):
    """A checkpoint of a reward model (load_reward_model reads it back)."""
    save_checkpoint(path, reward_model, reward_model=True, **metadata)


def load_reward_model(path):
    """The reward model saved at `path` by save_reward_model: a GPT with its scalar head."""
    info = read_checkpoint(path)
    if not info["metadata"].get("reward_model"):
        raise ValueError(f"{path} is not a reward-model checkpoint (written by save_reward_model or "
                         "`tinygrad-llm finetune reward`)")
    dtype = info["tensors"]["model.tok_emb.weight"][1]
    reward_model = make_reward_model(GPTModel(info["config"], dtype=dtype, init_weights=False), seed=0)
    load_checkpoint(path, reward_model)
    return reward_model


def plot_panels(path, x_label, panels):
    """A PNG of line plots side by side: panels is [(title, {label: (xs, ys)}), ...]; returns the path.

    For the DPO losses and reward margins, the reward model's loss and accuracy, PPO's reward and KL.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise RuntimeError("the plots need matplotlib: pip install 'tinygrad_llm[plot]'") from error
    # A bare Figure draws without pyplot: no GUI backend is touched and nothing global changes.
    fig = Figure(figsize=(5 * len(panels), 3.2))
    FigureCanvasAgg(fig)
    for i, (title, series) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, label=label)
        ax.set_xlabel(x_label)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
