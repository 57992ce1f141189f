"""Wrong solutions as students write them, each with one known mistake.

MISTAKES lists (exercise, function, words the grader's message must contain): every
function must fail its exercise with a hint that names the mistake.
"""
import math

import numpy as np


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _naive_softmax(x):
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


# ---- chapter 2 -----------------------------------------------------------------------------


def bpe_merge__first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if ids[i] == pair[0] and ids[i + 1] == pair[1]:
            return ids[:i] + [new_id] + ids[i + 2:]
    return list(ids)


def bpe_merge__no_skip(ids, pair, new_id):
    out = []
    for i in range(len(ids)):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new_id)
        else:
            out.append(ids[i])
    return out


def sliding_window_pairs__unshifted(token_ids, max_length, stride):
    starts = range(0, len(token_ids) - max_length, stride)
    inputs = np.array([token_ids[s:s + max_length] for s in starts])
    return inputs, inputs.copy()


# ---- chapter 3 -----------------------------------------------------------------------------


def softmax_backward__keepdims_lost(dout, y):
    return y * (dout - np.sum(dout * y, axis=-1))


def softmax_backward__sign_error(dout, y):
    return y * ((dout * y).sum(axis=-1, keepdims=True) - dout)


def softmax_backward__diagonal_only(dout, y):
    return dout * y


def _attention(q, k, v, mask_k=1, scale=True, softmax=_softmax):
    T, D = q.shape[-2], q.shape[-1]
    scores = q @ k.swapaxes(-1, -2)
    if scale:
        scores = scores / math.sqrt(D)
    scores = np.where(np.triu(np.ones((T, T), dtype=bool), k=mask_k), -np.inf, scores)
    return softmax(scores) @ v


def causal_attention_forward__mask_off_by_one(q, k, v):
    return _attention(q, k, v, mask_k=0)


def causal_attention_forward__no_scale(q, k, v):
    return _attention(q, k, v, scale=False)


def causal_attention_forward__unstable(q, k, v):
    return _attention(q, k, v, softmax=_naive_softmax)


def split_heads__reshape_only(x, num_heads):
    B, T, C = x.shape
    return x.reshape(B, num_heads, T, C // num_heads)


def merge_heads__reshape_only(x):
    B, H, T, D = x.shape
    return x.reshape(B, T, H * D)


def _attention_backward(dout, q, k, v, transpose_dv=True, scale_dq=True):
    D = q.shape[-1]
    T = q.shape[-2]
    scores = q @ k.swapaxes(-1, -2) / math.sqrt(D)
    scores = np.where(np.triu(np.ones((T, T), dtype=bool), k=1), -np.inf, scores)
    P = _softmax(scores)
    dv = (P.swapaxes(-1, -2) if transpose_dv else P) @ dout
    dP = dout @ v.swapaxes(-1, -2)
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
    dq = dS @ k / (math.sqrt(D) if scale_dq else 1.0)
    dk = dS.swapaxes(-1, -2) @ q / math.sqrt(D)
    return dq, dk, dv


def causal_attention_backward__transposed_dv(dout, q, k, v):
    return _attention_backward(dout, q, k, v, transpose_dv=False)


def causal_attention_backward__dq_unscaled(dout, q, k, v):
    return _attention_backward(dout, q, k, v, scale_dq=False)


# ---- chapter 4 -----------------------------------------------------------------------------


def _layer_norm_backward(dout, x, scale, eps, ddof=0, mean_term=True, keepdims=False):
    n = x.shape[-1]
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).sum(axis=-1, keepdims=True) / (n - ddof)
    rstd = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    dxhat = dout * scale
    dx = rstd * (dxhat - (dxhat.mean(axis=-1, keepdims=True) if mean_term else 0)
                 - xhat * (dxhat * xhat).sum(axis=-1, keepdims=True) / (n - ddof))
    axes = tuple(range(x.ndim - 1))
    return dx, (dout * xhat).sum(axis=axes, keepdims=keepdims), dout.sum(axis=axes, keepdims=keepdims)


def layer_norm_backward__unbiased_variance(dout, x, scale, eps):
    return _layer_norm_backward(dout, x, scale, eps, ddof=1)


def layer_norm_backward__missing_mean_term(dout, x, scale, eps):
    return _layer_norm_backward(dout, x, scale, eps, mean_term=False)


def layer_norm_backward__keepdims_kept(dout, x, scale, eps):
    return _layer_norm_backward(dout, x, scale, eps, keepdims=True)


_C, _A = math.sqrt(2 / math.pi), 0.044715


def gelu_backward__no_chain_rule(dout, x):
    t = np.tanh(_C * (x + _A * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * _C * (1 + 3 * _A * x ** 2)


def gelu_backward__exact_erf(dout, x):
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    pdf = np.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi)
    return dout * (cdf + x * pdf)


def linear_backward__transposed_dweight(dout, x, weight):
    x2, d2 = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
    return dout @ weight, x2.T @ d2, d2.sum(axis=0)


def linear_backward__mean_bias(dout, x, weight):
    x2, d2 = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
    return dout @ weight, d2.T @ x2, d2.mean(axis=0)


# ---- chapter 5 -----------------------------------------------------------------------------


def cross_entropy_backward__missing_mean(logits, targets):
    grad = _softmax(logits)
    grad[np.arange(len(targets)), targets] -= 1
    return grad


def cross_entropy_backward__unstable(logits, targets):
    grad = _naive_softmax(logits)
    grad[np.arange(len(targets)), targets] -= 1
    return grad / len(targets)


def cross_entropy_backward__sign_error(logits, targets):
    grad = -_softmax(logits)
    grad[np.arange(len(targets)), targets] += 1
    return grad / len(targets)


def adamw_step__no_bias_correction(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    param = param * (1 - lr * weight_decay)
    m = betas[0] * exp_avg + (1 - betas[0]) * grad
    v = betas[1] * exp_avg_sq + (1 - betas[1]) * grad ** 2
    return param - lr * m / (np.sqrt(v) + eps), m, v


def adamw_step__coupled_decay(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    grad = grad + weight_decay * param
    m = betas[0] * exp_avg + (1 - betas[0]) * grad
    v = betas[1] * exp_avg_sq + (1 - betas[1]) * grad ** 2
    m_hat, v_hat = m / (1 - betas[0] ** step), v / (1 - betas[1] ** step)
    return param - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def softmax_with_temperature__multiplied(logits, temperature):
    return _softmax(logits * temperature)


def softmax_with_temperature__unstable(logits, temperature):
    return _naive_softmax(logits / temperature)


def top_k_filter__exactly_k(logits, top_k):
    out = np.full_like(logits, -np.inf)
    keep = np.argsort(logits, axis=-1)[..., -top_k:]
    np.put_along_axis(out, keep, np.take_along_axis(logits, keep, axis=-1), axis=-1)
    return out


def top_k_filter__k_plus_one(logits, top_k):
    kth = np.sort(logits, axis=-1)[..., -min(top_k + 1, logits.shape[-1]), None]
    return np.where(logits < kth, -np.inf, logits)


def _nucleus(logits, top_p, strict):
    probs = _softmax(logits)
    sorted_probs = -np.sort(-probs, axis=-1)
    cumulative = np.cumsum(sorted_probs, axis=-1)
    inside = cumulative < top_p if strict else cumulative - sorted_probs < top_p
    last = np.maximum(inside.sum(axis=-1, keepdims=True) - 1, 0)
    cutoff = np.take_along_axis(sorted_probs, last, axis=-1)
    return probs, probs >= cutoff


def top_p_filter__drops_reaching_token(logits, top_p):
    _, keep = _nucleus(logits, top_p, strict=True)
    return np.where(keep, logits, -np.inf)


def top_p_filter__ties_dropped(logits, top_p):
    probs = _softmax(logits)
    order = np.argsort(-probs, axis=-1)
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    inside = np.cumsum(sorted_probs, axis=-1) - sorted_probs < top_p
    keep = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(keep, order, inside, axis=-1)
    return np.where(keep, logits, -np.inf)


def top_p_filter__returns_probabilities(logits, top_p):
    probs, keep = _nucleus(logits, top_p, strict=False)
    return np.where(keep, probs, -np.inf)


# ---- appendix D ----------------------------------------------------------------------------


def warmup_cosine_lr__warmup_ahead(step, peak_lr, total_steps, warmup_steps, initial_lr, min_lr):
    if step < warmup_steps:
        return initial_lr + (step + 1) * (peak_lr - initial_lr) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_lr__decays_to_zero(step, peak_lr, total_steps, warmup_steps, initial_lr, min_lr):
    if step < warmup_steps:
        return initial_lr + step * (peak_lr - initial_lr) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


def clip_grad_norm__per_tensor(grads, max_norm):
    total = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    clipped = []
    for g in grads:
        norm = float(np.sqrt((g ** 2).sum()))
        clipped.append(g * min(1.0, max_norm / (norm + 1e-6)))
    return clipped, total


def clip_grad_norm__always_scales(grads, max_norm):
    total = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    return [g * (max_norm / (total + 1e-6)) for g in grads], total


# ---- appendix E ----------------------------------------------------------------------------


def lora_forward__alpha_without_rank(x, weight, bias, A, B, alpha):
    return x @ weight.T + bias + alpha * (x @ A @ B)


def lora_backward__dx_without_adapter(dout, x, weight, A, B, alpha):
    s = alpha / A.shape[1]
    x2, d2 = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
    return dout @ weight, s * x2.T @ (d2 @ B.T), s * (x2 @ A).T @ d2


# ---- chapter 6 -----------------------------------------------------------------------------


def classification_accuracy__first_token(logits, labels):
    return float((logits[:, 0, :].argmax(axis=-1) == labels).mean())


def classification_accuracy__count_not_fraction(logits, labels):
    return float((logits[:, -1, :].argmax(axis=-1) == labels).sum())


# ---- chapters 7 and 8 ---------------------------------------------------------------------


def _collate(batch, pad_token_id, ignore_index, allowed_max_length, instruction_lengths, first_pad_kept, shift):
    longest = max(len(ids) for ids in batch) + 1
    inputs, targets = [], []
    for i, ids in enumerate(batch):
        padded = list(ids) + [pad_token_id] * (longest - len(ids))
        target = padded[1:]
        for t in range(len(ids) - (0 if first_pad_kept else 1), len(target)):
            target[t] = ignore_index
        if instruction_lengths is not None:
            for t in range(instruction_lengths[i] - shift):
                target[t] = ignore_index
        inputs.append(padded[:-1][:allowed_max_length])
        targets.append(target[:allowed_max_length])
    return np.array(inputs), np.array(targets)


def masked_collate__first_pad_masked(batch, pad_token_id, ignore_index, allowed_max_length, instruction_lengths):
    return _collate(batch, pad_token_id, ignore_index, allowed_max_length, instruction_lengths, False, 1)


def masked_collate__mask_off_by_one(batch, pad_token_id, ignore_index, allowed_max_length, instruction_lengths):
    return _collate(batch, pad_token_id, ignore_index, allowed_max_length, instruction_lengths, True, 0)


def dpo_loss__sign_error(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs,
                         reference_rejected_logprobs, beta):
    logits = (reference_chosen_logprobs - reference_rejected_logprobs) - (model_chosen_logprobs - model_rejected_logprobs)
    loss = np.logaddexp(0.0, -beta * logits).mean()
    return loss, np.mean(model_chosen_logprobs - reference_chosen_logprobs), \
        np.mean(model_rejected_logprobs - reference_rejected_logprobs)


def dpo_loss__rewards_with_beta(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs,
                                reference_rejected_logprobs, beta):
    logits = (model_chosen_logprobs - model_rejected_logprobs) - (reference_chosen_logprobs - reference_rejected_logprobs)
    loss = np.logaddexp(0.0, -beta * logits).mean()
    return loss, beta * np.mean(model_chosen_logprobs - reference_chosen_logprobs), \
        beta * np.mean(model_rejected_logprobs - reference_rejected_logprobs)


MISTAKES = [
    ("bpe_merge", "bpe_merge__first_only", "only the first occurrence"),
    ("bpe_merge", "bpe_merge__no_skip", "skip both ids"),
    ("sliding_window_pairs", "sliding_window_pairs__unshifted", "targets are not shifted"),
    ("softmax_backward", "softmax_backward__keepdims_lost", "keepdims lost"),
    ("softmax_backward", "softmax_backward__sign_error", "sign error"),
    ("softmax_backward", "softmax_backward__diagonal_only", "only the diagonal"),
    ("causal_attention_forward", "causal_attention_forward__mask_off_by_one", "mask off by one"),
    ("causal_attention_forward", "causal_attention_forward__no_scale", "not scaled by 1/sqrt(D)"),
    ("causal_attention_forward", "causal_attention_forward__unstable", "subtract the row maximum"),
    ("split_heads", "split_heads__reshape_only", "reshape straight"),
    ("merge_heads", "merge_heads__reshape_only", "swap axes 1 and 2 first"),
    ("causal_attention_backward", "causal_attention_backward__transposed_dv", "transposed matrix"),
    ("causal_attention_backward", "causal_attention_backward__dq_unscaled", "dq misses the 1/sqrt(D)"),
    ("layer_norm_backward", "layer_norm_backward__unbiased_variance", "unbiased variance"),
    ("layer_norm_backward", "layer_norm_backward__missing_mean_term", "mean term is missing"),
    ("layer_norm_backward", "layer_norm_backward__keepdims_kept", "keepdims"),
    ("gelu_backward", "gelu_backward__no_chain_rule", "chain rule"),
    ("gelu_backward", "gelu_backward__exact_erf", "exact GELU"),
    ("linear_backward", "linear_backward__transposed_dweight", "transposed matrix"),
    ("linear_backward", "linear_backward__mean_bias", "divided by N"),
    ("cross_entropy_backward", "cross_entropy_backward__missing_mean", "missing 1/N"),
    ("cross_entropy_backward", "cross_entropy_backward__unstable", "subtract the row maximum"),
    ("cross_entropy_backward", "cross_entropy_backward__sign_error", "sign error"),
    ("adamw_step", "adamw_step__no_bias_correction", "bias correction is missing"),
    ("adamw_step", "adamw_step__coupled_decay", "coupled"),
    ("softmax_with_temperature", "softmax_with_temperature__multiplied", "multiplied by the temperature"),
    ("softmax_with_temperature", "softmax_with_temperature__unstable", "subtract the row maximum"),
    ("top_k_filter", "top_k_filter__exactly_k", "ties dropped"),
    ("top_k_filter", "top_k_filter__k_plus_one", "off by one"),
    ("top_p_filter", "top_p_filter__drops_reaching_token", "off by one"),
    ("top_p_filter", "top_p_filter__ties_dropped", "ties dropped"),
    ("top_p_filter", "top_p_filter__returns_probabilities", "probabilities returned"),
    ("warmup_cosine_lr", "warmup_cosine_lr__warmup_ahead", "one step ahead"),
    ("warmup_cosine_lr", "warmup_cosine_lr__decays_to_zero", "ends at min_lr"),
    ("clip_grad_norm", "clip_grad_norm__per_tensor", "joint norm"),
    ("clip_grad_norm", "clip_grad_norm__always_scales", "scaled up"),
    ("lora_forward", "lora_forward__alpha_without_rank", "alpha / rank"),
    ("lora_backward", "lora_backward__dx_without_adapter", "adapter's path"),
    ("classification_accuracy", "classification_accuracy__first_token", "the first position was read"),
    ("classification_accuracy", "classification_accuracy__count_not_fraction", "missing 1/N"),
    ("masked_collate", "masked_collate__first_pad_masked", "first pad of each item must stay"),
    ("masked_collate", "masked_collate__mask_off_by_one", "instruction mask off by one"),
    ("dpo_loss", "dpo_loss__sign_error", "sign error"),
    ("dpo_loss", "dpo_loss__rewards_with_beta", "without beta"),
]
