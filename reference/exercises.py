"""The torch answers to the grading exercises (tinygrad_llm/grading/), NumPy in and out.

Each function takes the exercise's arguments as NumPy arrays and numbers and returns what
a correct solution returns. Gradients come from torch autograd on the forward written as
torch or the book write it; nothing here is the library's own code.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.adam import _single_tensor_adam

from . import instruct, ops, preference, sampling


def _t(a, requires_grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=requires_grad)


def _np(*tensors):
    out = tuple(t.detach().numpy() for t in tensors)
    return out[0] if len(out) == 1 else out


# ---- chapter 2 ---------------------------------------------------------------------------


def bpe_merge(ids, pair, new_id):
    """Scan left to right; a match consumes both ids, so overlapping matches resolve leftmost first."""
    out, rest = [], list(ids)
    while rest:
        if len(rest) >= 2 and (rest[0], rest[1]) == tuple(pair):
            out.append(new_id)
            rest = rest[2:]
        else:
            out.append(rest[0])
            rest = rest[1:]
    return out


def sliding_window_pairs(token_ids, max_length, stride):
    """The book's GPTDatasetV1: windows starting at 0, stride, ... while a target window fits."""
    token_ids = torch.tensor(token_ids, dtype=torch.int64)
    inputs, targets = [], []
    for i in range(0, len(token_ids) - max_length, stride):
        inputs.append(token_ids[i:i + max_length])
        targets.append(token_ids[i + 1:i + max_length + 1])
    if not inputs:
        empty = torch.empty((0, max_length), dtype=torch.int64)
        return empty.numpy(), empty.numpy()
    return torch.stack(inputs).numpy(), torch.stack(targets).numpy()


# ---- chapter 3 ---------------------------------------------------------------------------


def softmax_backward(dout, y):
    # y = softmax(x) for x = log y (softmax is shift-invariant, so any such x gives y)
    x = torch.log(_t(y)).requires_grad_()
    (dx,) = torch.autograd.grad(torch.softmax(x, dim=-1), x, _t(dout))
    return _np(dx)


def causal_attention_forward(q, k, v):
    return _np(ops.causal_attention(_t(q), _t(k), _t(v)))


def causal_attention_backward(dout, q, k, v):
    q, k, v = _t(q, True), _t(k, True), _t(v, True)
    return _np(*torch.autograd.grad(ops.causal_attention(q, k, v), (q, k, v), _t(dout)))


def split_heads(x, num_heads):
    B, T, C = x.shape
    return _np(_t(x).view(B, T, num_heads, C // num_heads).transpose(1, 2))


def merge_heads(x):
    B, H, T, D = x.shape
    return _np(_t(x).transpose(1, 2).contiguous().view(B, T, H * D))


# ---- chapter 4 ---------------------------------------------------------------------------


def layer_norm_backward(dout, x, scale, eps):
    x, scale = _t(x, True), _t(scale, True)
    shift = torch.zeros_like(scale, requires_grad=True)
    return _np(*torch.autograd.grad(ops.layer_norm(x, scale, shift, eps), (x, scale, shift), _t(dout)))


def gelu_backward(dout, x):
    x = _t(x, True)
    (dx,) = torch.autograd.grad(F.gelu(x, approximate="tanh"), x, _t(dout))
    return _np(dx)


def linear_backward(dout, x, weight):
    # the bias's value does not change any gradient
    x, weight = _t(x, True), _t(weight, True)
    bias = torch.zeros(weight.shape[0], dtype=torch.float64, requires_grad=True)
    return _np(*torch.autograd.grad(F.linear(x, weight, bias), (x, weight, bias), _t(dout)))


# ---- chapter 5 ---------------------------------------------------------------------------


def cross_entropy_backward(logits, targets):
    logits = _t(logits, True)
    loss = F.cross_entropy(logits, torch.tensor(np.asarray(targets), dtype=torch.int64))
    (dlogits,) = torch.autograd.grad(loss, logits)
    return _np(dlogits)


def softmax_with_temperature(logits, temperature):
    return _np(torch.softmax(_t(logits) / temperature, dim=-1))


def _rows(fn, logits, *args):
    """Apply a (B, V) filter to (V,) or (B, V) logits."""
    logits = _t(logits)
    out = fn(logits.reshape(-1, logits.shape[-1]), *args)
    return _np(out.reshape(logits.shape))


def top_k_filter(logits, top_k):
    return _rows(sampling.top_k_filter, logits, top_k)


def top_p_filter(logits, top_p):
    return _rows(sampling.top_p_filter, logits, top_p)


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """One torch.optim.AdamW step from the given state (`step` counts this step, from 1).

    This calls the update torch.optim.AdamW(foreach=False).step() runs, directly:
    step() itself imports torch._dynamo, seconds in every grading process.
    tests/test_grading.py checks that both agree.
    """
    p, m, v = _t(param), _t(exp_avg), _t(exp_avg_sq)
    _single_tensor_adam([p], [_t(grad)], [m], [v], [], [torch.tensor(float(step - 1))], None, None,
                        amsgrad=False, has_complex=False, beta1=betas[0], beta2=betas[1], lr=lr,
                        weight_decay=weight_decay, eps=eps, maximize=False, capturable=False,
                        differentiable=False, decoupled_weight_decay=True)
    return _np(p, m, v)


# ---- appendix D ---------------------------------------------------------------------------


def warmup_cosine_lr(step, peak_lr, total_steps, warmup_steps, initial_lr, min_lr):
    return ops.appendix_d_lr(step, peak_lr, total_steps, warmup_steps, initial_lr, min_lr)


def clip_grad_norm(grads, max_norm):
    params = [_t(np.zeros_like(g), True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = _t(g)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return [p.grad.numpy() for p in params], float(total)


# ---- appendix E ---------------------------------------------------------------------------


def _lora(x, weight, bias, A, B, alpha):
    # The book's LinearWithLoRA: linear(x) + (alpha / rank) * x @ A @ B
    return F.linear(x, weight, bias) + (alpha / A.shape[1]) * (x @ A @ B)


def lora_forward(x, weight, bias, A, B, alpha):
    return _np(_lora(_t(x), _t(weight), _t(bias), _t(A), _t(B), alpha))


def lora_backward(dout, x, weight, A, B, alpha):
    x, A, B = _t(x, True), _t(A, True), _t(B, True)
    out = _lora(x, _t(weight), None, A, B, alpha)
    return _np(*torch.autograd.grad(out, (x, A, B), _t(dout)))


# ---- chapter 6 --------------------------------------------------------------------------------


def classification_accuracy(logits, labels):
    """The book's calc_accuracy_loader on one batch: argmax of the last position's logits."""
    logits = _t(logits)[:, -1, :]
    predicted_labels = torch.argmax(logits, dim=-1)
    correct = (predicted_labels == torch.tensor(np.asarray(labels))).sum().item()
    return correct / predicted_labels.shape[0]


# ---- chapters 7 and 8 ------------------------------------------------------------------------


def masked_collate(batch, pad_token_id, ignore_index, allowed_max_length, instruction_lengths):
    masked = instruction_lengths is not None
    items = list(zip(instruction_lengths, batch)) if masked else batch
    inputs, targets = instruct.custom_collate_fn(items, pad_token_id, ignore_index, allowed_max_length,
                                                 mask_instruction=masked)
    return inputs.numpy(), targets.numpy()


def dpo_loss(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs,
             reference_rejected_logprobs, beta):
    out = preference.compute_dpo_loss(_t(model_chosen_logprobs), _t(model_rejected_logprobs),
                                      _t(reference_chosen_logprobs), _t(reference_rejected_logprobs), beta)
    return tuple(float(t) for t in out)
