"""RLHF with PPO (beyond the book): the policy learns from a reward function's scores.

Follows OpenAI's lm-human-preferences (Ziegler et al. 2019) and TRL's GPT-2 runs. Each
step samples responses to a batch of prompts with the KV cache (top_k 0, top_p 1: the
policy's own distribution, so the KL estimate below is unbiased), scores them, and turns
the scores into per-token rewards: -kl_coef (logp - ref_logp) at every response token, the
score added at the last one. Generalised advantage estimation (GAE) then gives each token
an advantage and a return, and several PPO epochs over the same rollouts update the policy
with the clipped objective and a value model with a clipped squared error.

Masks are 1 on the response tokens of each row (up to and including its end token) and 0
on the padding after it; every mean below is over the masked tokens of the whole batch.
"""
import copy
import math
import os

import numpy as np
from tqdm.auto import tqdm

from .. import backend
from .. import functional as F
from ..checkpoint import load_checkpoint, save_checkpoint
from ..generate import generate_stream
from ..nn import UNFILLED, Linear
from ..optim import AdamW
from ..tensor import Tensor, no_grad, where
from ..train import StopOnSignals, TrainingDivergedError, TrainingInterrupted, clip_gradients
from .preference import make_reference_model


def _masked_mean(values, mask):
    """Mean of a Tensor over the positions where the (host or device) mask is 1; 0 if there are none."""
    mask = _device_mask(mask, values)
    return (values * mask).sum() / max(float(mask.sum()), 1.0)


def _device_mask(mask, like):
    mask = mask.data if isinstance(mask, Tensor) else mask
    if backend.device_of(mask) != "cuda":
        mask = np.asarray(mask)
    return backend.to_device(mask, like.device).astype(like.dtype, copy=False)


def _constant(x, like):
    """An array (no gradient) beside the Tensor `like`, in its dtype."""
    return Tensor(_device_mask(x, like))


def _clip(x, low, high):
    """x limited to [low, high] (scalars or Tensors); the gradient flows where x lies inside, as torch.clamp."""
    x = where(x.data < (low.data if isinstance(low, Tensor) else low), low, x)
    return where(x.data > (high.data if isinstance(high, Tensor) else high), high, x)


def _maximum(a, b):
    """The elementwise larger of two Tensors; the gradient goes to the one chosen (a on ties)."""
    return where(a.data >= b.data, a, b)


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimates and returns of each response token: arrays (B, T).

    With delta_t = r_t + gamma V_{t+1} - V_t (V after the last response token is 0):
        A_t = delta_t + gamma lam A_{t+1},   return_t = A_t + V_t,
    computed backwards over the tokens, all rows at once; 0 where the mask is 0.
    """
    rewards, values, mask = (np.asarray(backend.to_host(a), dtype=np.float64) for a in (rewards, values, mask))
    if not rewards.shape == values.shape == mask.shape or rewards.ndim != 2:
        raise ValueError(f"compute_gae expects rewards, values and mask of one shape (batch, tokens), got "
                         f"{rewards.shape}, {values.shape} and {mask.shape}")
    advantages = np.zeros_like(rewards)
    next_value, next_advantage = np.zeros(len(rewards)), np.zeros(len(rewards))
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        # A masked position ends its row's episode: nothing flows back through it.
        next_value, next_advantage = values[:, t] * mask[:, t], advantages[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2):
    """PPO's clipped surrogate, to minimise: mean over the masked tokens of
    max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range)), ratio = exp(logp - old_logp).

    logprobs (B, T) is a Tensor; old_logprobs, advantages and mask are constants.
    """
    ratio = (logprobs - _constant(old_logprobs, logprobs)).exp()
    advantages = _constant(advantages, logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * _clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return _masked_mean(_maximum(unclipped, clipped), mask)


def ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2):
    """The clipped value loss, 0.5 * mean over the masked tokens of
    max((V - R)^2, (old_V + clip(V - old_V, -c, c) - R)^2).
    """
    old_values = _constant(old_values, values)
    returns = _constant(returns, values)
    clipped = old_values + _clip(values - old_values, -clip_range_value, clip_range_value)
    return _masked_mean(_maximum((values - returns) ** 2, (clipped - returns) ** 2), mask) * 0.5


# ---- models and rollouts ---------------------------------------------------------------------


def make_value_model(policy):
    """The value model: a copy of the policy whose output head is Linear(emb_dim, 1) set to zero,
    so every value starts at 0 (the returns then teach it); trunk and head are trained."""
    value_model = copy.deepcopy(policy)
    value_model.out_head = Linear(policy.cfg["emb_dim"], 1, dtype=policy.dtype, rng=UNFILLED)
    value_model.out_head.weight.data[...] = 0.0
    value_model.out_head.bias.data[...] = 0.0
    return value_model.to(device=policy.device)


def response_logprobs(model, sequences, prompt_length):
    """log p(response token t | everything before it) for sequences (B, P + R) -> Tensor (B, R)."""
    logits = model(sequences)  # (B, P + R, V): position i predicts token i + 1
    targets = backend.to_device(np.asarray(sequences[:, prompt_length:]), logits.device)
    return F.token_log_probs(logits[:, prompt_length - 1:-1], targets)


def response_values(value_model, sequences, prompt_length):
    """The value of each response token's state (the sequence before it) -> Tensor (B, R)."""
    return value_model(sequences)[:, prompt_length - 1:-1, 0]


def sample_responses(policy, prompt_ids, response_length, eos_id=None, seed=None):
    """Responses sampled from the policy's own distribution (temperature 1, no top-k or top-p),
    with the KV cache: (responses (B, R) int64, mask (B, R) float64).

    The mask is 1 up to and including each row's first eos_id; after it the row holds eos_id.
    """
    steps = list(generate_stream(policy, prompt_ids, response_length, policy.cfg["context_length"],
                                 temperature=1.0, eos_id=eos_id, seed=seed))
    responses = np.full((len(prompt_ids), response_length), 0 if eos_id is None else eos_id, dtype=np.int64)
    if steps:
        responses[:, :len(steps)] = np.stack(steps, axis=1)
    if eos_id is None:
        return responses, np.ones(responses.shape)
    is_eos = responses == eos_id
    # Ones before the first eos and at it: the eos token is the response's last action.
    mask = (np.cumsum(is_eos, axis=1) - is_eos) == 0
    return responses, mask.astype(np.float64)


def _check_scores(scores, batch_size):
    try:
        scores = np.asarray(backend.to_host(scores.data if isinstance(scores, Tensor) else scores), dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"reward_fn must return one float score per response, ({batch_size},); got {error}") from None
    if scores.shape != (batch_size,):
        raise ValueError(f"reward_fn returned scores of shape {scores.shape}; expected one score per response, "
                         f"shape ({batch_size},)")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"reward_fn returned {scores[bad]} for response {bad}: every score must be a finite number")
    return scores


def _whiten(values, mask):
    """(values - mean) / std over the masked tokens, 0 elsewhere (lm-human-preferences' whiten)."""
    count = max(mask.sum(), 1.0)
    mean = (values * mask).sum() / count
    variance = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) / math.sqrt(variance + 1e-8) * mask


def make_rollouts(policy, value_model, reference_model, reward_fn, prompts, response_length, kl_coef,
                  eos_id=None, seed=None, gamma=1.0, lam=0.95):
    """Sample, score and evaluate one batch of prompts: the fixed data of one PPO update (a dict).

    Prompts of one length are one group, generated and later trained on as one batch (the
    model attends without a padding mask). Row order: the groups one after the other.
    Per-token rewards: -kl_coef (logp - ref_logp), plus the score at each row's last token.
    """
    groups, rows = [], []
    lengths = np.array([len(prompt) for prompt in prompts])
    rng = np.random.default_rng(seed)
    for length in np.unique(lengths):
        members = np.flatnonzero(lengths == length)
        prompt_ids = np.stack([np.asarray(prompts[i], dtype=np.int64) for i in members])
        responses, mask = sample_responses(policy, prompt_ids, response_length, eos_id, int(rng.integers(2**32)))
        groups.append((np.concatenate([prompt_ids, responses], axis=1), int(length)))
        rows.append((members, responses, mask))
    mask = np.concatenate([m for _, _, m in rows])
    responses = [r[mask_row > 0] for _, group_responses, group_mask in rows
                 for r, mask_row in zip(group_responses, group_mask)]
    order = np.concatenate([members for members, _, _ in rows])
    scores = _check_scores(reward_fn([np.asarray(prompts[i]) for i in order], responses), len(order))

    with no_grad():
        logprobs = np.concatenate([backend.to_host(response_logprobs(policy, seq, p).data) for seq, p in groups])
        ref_logprobs = np.concatenate([backend.to_host(response_logprobs(reference_model, seq, p).data)
                                       for seq, p in groups])
        values = np.concatenate([backend.to_host(response_values(value_model, seq, p).data) for seq, p in groups])
    logprobs, ref_logprobs, values = (a.astype(np.float64) * mask for a in (logprobs, ref_logprobs, values))
    kl = (logprobs - ref_logprobs) * mask  # (B, R): an unbiased estimate of the KL, token by token
    rewards = -kl_coef * kl
    rewards[np.arange(len(mask)), mask.sum(axis=1).astype(np.int64) - 1] += scores
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    return {"groups": groups, "mask": mask, "logprobs": logprobs, "values": values, "scores": scores,
            "kl": kl.sum(axis=1), "advantages": _whiten(advantages, mask), "returns": returns}


# ---- the PPO update --------------------------------------------------------------------------


def ppo_update(policy, value_model, optimizer, rollouts, ppo_epochs=4, clip_range=0.2, clip_range_value=0.2,
               vf_coef=0.1, grad_clip=1.0):
    """`ppo_epochs` optimizer steps on the same rollouts, each over the whole batch: loss =
    ppo_policy_loss + vf_coef * ppo_value_loss, gradients clipped to `grad_clip` (train's rule).

    Returns one dict per epoch: policy_loss, value_loss, clip_fraction (tokens whose ratio
    left [1 - clip_range, 1 + clip_range]) and approx_kl (mean of (logp - old_logp)^2 / 2).
    """
    mask = rollouts["mask"]
    total = max(mask.sum(), 1.0)
    params = [*policy.parameters(), *value_model.parameters()]
    stats = []
    for ppo_epoch in range(ppo_epochs):
        optimizer.zero_grad()
        sums = dict.fromkeys(("policy_loss", "value_loss", "clip_fraction", "approx_kl"), 0.0)
        start = 0
        for sequences, prompt_length in rollouts["groups"]:
            rows = slice(start, start + len(sequences))
            start += len(sequences)
            group_mask = mask[rows]
            share = group_mask.sum() / total  # the group's part of the masked mean over the batch
            logprobs = response_logprobs(policy, sequences, prompt_length)
            values = response_values(value_model, sequences, prompt_length)
            policy_loss = ppo_policy_loss(logprobs, rollouts["logprobs"][rows], rollouts["advantages"][rows],
                                          group_mask, clip_range)
            value_loss = ppo_value_loss(values, rollouts["values"][rows], rollouts["returns"][rows], group_mask,
                                        clip_range_value)
            loss = (policy_loss + value_loss * vf_coef) * share
            if not math.isfinite(loss.item()):
                raise TrainingDivergedError(f"PPO stopped: the loss is {loss.item()} in PPO epoch {ppo_epoch + 1}; "
                                            "try a lower learning rate or a smaller clip range")
            loss.backward()
            log_ratio = backend.to_host(logprobs.data).astype(np.float64) - rollouts["logprobs"][rows]
            sums["policy_loss"] += policy_loss.item() * share
            sums["value_loss"] += value_loss.item() * share
            sums["clip_fraction"] += float(((np.abs(np.exp(log_ratio) - 1.0) > clip_range) * group_mask).sum()) / total
            sums["approx_kl"] += float((0.5 * log_ratio ** 2 * group_mask).sum()) / total
        if grad_clip is not None:
            clip_gradients(params, grad_clip, step=0, during_warmup=True)
        optimizer.step()
        stats.append(sums)
    return stats


# ---- the PPO run -----------------------------------------------------------------------------


def value_checkpoint_path(checkpoint_path):
    """Where train_ppo keeps the value model beside its checkpoint: NAME.value.safetensors."""
    root, extension = os.path.splitext(os.fspath(checkpoint_path))
    return f"{root}.value{extension or '.safetensors'}"


def _check_prompts(prompts, response_length, cfg):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of 1-D arrays of token ids")
    for i, prompt in enumerate(prompts):
        prompt = np.asarray(prompt)
        if prompt.ndim != 1 or prompt.size == 0 or prompt.dtype.kind not in "iu":
            raise ValueError(f"prompt {i} must be a non-empty 1-D array of token ids, got shape {prompt.shape} "
                             f"of {prompt.dtype}")
        if prompt.size + response_length > cfg["context_length"]:
            raise ValueError(f"prompt {i} ({prompt.size} tokens) and a response of {response_length} tokens exceed "
                             f"the context length {cfg['context_length']}")


def train_ppo(policy, reward_fn, prompts, num_steps, response_length, lr=1e-5, kl_coef=0.2, seed=None, *,
              batch_size=8, ppo_epochs=4, target_kl=6.0, kl_horizon=10000, clip_range=0.2, clip_range_value=0.2,
              vf_coef=0.1, gamma=1.0, lam=0.95, eos_id=None, grad_clip=1.0, weight_decay=0.0,
              reference_model=None, value_model=None, checkpoint_path=None, save_every=None, resume=False,
              progress=True):
    """RLHF with PPO: `num_steps` rounds of rollouts on `batch_size` prompts, then `ppo_epochs` updates.

    policy: a GPTModel, trained in place. reward_fn(prompt_ids, response_ids) -> (B,) scores,
    both lists of 1-D int arrays (a response ends at its eos_id, included). prompts: a list
    of 1-D token-id arrays, drawn at random each step. kl_coef: the initial KL coefficient;
    with target_kl it adapts as lm-human-preferences' controller, by
    1 + clip(kl / target_kl - 1, -0.2, 0.2) * batch_size / kl_horizon per step (target_kl=None:
    fixed). The reference model (default: a frozen copy of the policy) and the value model
    (default: make_value_model) stay as given. The optimizer is AdamW(lr, weight_decay) over
    the policy and the value model; gradients are clipped to grad_clip. Dropout is off throughout.

    With checkpoint_path the run is saved every save_every steps, on Ctrl-C / SIGTERM and at
    the end: the policy with the optimizer, the step, the KL coefficient, the history and the
    prompt sampler's state (a checkpoint `generate` reads), and the value model beside it
    (value_checkpoint_path). resume=True continues a saved run to num_steps, drawing what the
    uninterrupted run would have; pass the policy as it was at the start, since the default
    reference model is a copy of it.

    Returns the history: per-step lists "reward_mean", "reward_std", "kl" (the summed
    per-token KL of a response, averaged), "kl_coef", "clip_fraction", "policy_loss",
    "value_loss", "approx_kl" (the last PPO epoch's) and "response_length".
    """
    _check_prompts(prompts, response_length, policy.cfg)
    if num_steps < 1 or response_length < 1 or batch_size < 1 or ppo_epochs < 1:
        raise ValueError(f"num_steps, response_length, batch_size and ppo_epochs must be >= 1, got {num_steps}, "
                         f"{response_length}, {batch_size} and {ppo_epochs}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    reference_model = make_reference_model(policy) if reference_model is None else reference_model
    value_model = make_value_model(policy) if value_model is None else value_model
    optimizer = AdamW([*policy.parameters(), *value_model.parameters()], lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    modes = policy.training, value_model.training
    policy.eval()
    value_model.eval()
    history = {key: [] for key in ("reward_mean", "reward_std", "kl", "kl_coef", "clip_fraction", "policy_loss",
                                   "value_loss", "approx_kl", "response_length")}
    first_step = 0
    if resume:
        if checkpoint_path is None:
            raise ValueError("resume=True needs the checkpoint_path to resume from")
        state = load_checkpoint(checkpoint_path, policy, optimizer)["ppo_state"]
        load_checkpoint(value_checkpoint_path(checkpoint_path), value_model)
        first_step, kl_coef, history = state["step"], state["kl_coef"], state["history"]
        rng.bit_generator.state = state["sampler"]

    def save(steps_done):
        if checkpoint_path is not None:
            save_checkpoint(value_checkpoint_path(checkpoint_path), value_model)
            save_checkpoint(checkpoint_path, policy, optimizer, ppo_state={
                "step": steps_done, "kl_coef": kl_coef, "history": history, "sampler": rng.bit_generator.state})

    try:
        with StopOnSignals() as stop, tqdm(total=num_steps, initial=first_step, disable=not progress,
                                           unit="step") as bar:
            for step in range(first_step, num_steps):
                chosen = rng.choice(len(prompts), size=batch_size, replace=len(prompts) < batch_size)
                rollouts = make_rollouts(policy, value_model, reference_model, reward_fn,
                                         [prompts[i] for i in chosen], response_length, kl_coef, eos_id,
                                         int(rng.integers(2**32)), gamma, lam)
                stats = ppo_update(policy, value_model, optimizer, rollouts, ppo_epochs, clip_range,
                                   clip_range_value, vf_coef, grad_clip)
                kl = float(rollouts["kl"].mean())
                record = {"reward_mean": float(rollouts["scores"].mean()), "reward_std": float(rollouts["scores"].std()),
                          "kl": kl, "kl_coef": kl_coef,
                          "clip_fraction": float(np.mean([s["clip_fraction"] for s in stats])),
                          "policy_loss": stats[-1]["policy_loss"], "value_loss": stats[-1]["value_loss"],
                          "approx_kl": stats[-1]["approx_kl"], "response_length": float(rollouts["mask"].sum(1).mean())}
                for key, value in record.items():
                    history[key].append(value)
                if target_kl is not None:
                    error = np.clip(kl / target_kl - 1.0, -0.2, 0.2)
                    kl_coef *= 1.0 + error * batch_size / kl_horizon
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kl=f"{kl:.3f}",
                                clip=f"{record['clip_fraction']:.3f}")
                if save_every is not None and (step + 1) % save_every == 0:
                    save(step + 1)
                if stop.requested:
                    save(step + 1)
                    raise TrainingInterrupted(f"PPO interrupted after step {step}", stop.requested)
        save(num_steps)
    finally:
        policy.train(modes[0])
        value_model.train(modes[1])
    return history
