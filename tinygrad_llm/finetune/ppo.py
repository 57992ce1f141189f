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
import numpy as np

from .. import backend
from ..tensor import Tensor, where


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
