"""A solution to every exercise made of tinygrad_llm's own functions: it must pass them all."""
import numpy as np

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor
from tinygrad_llm.data import GPTDatasetV1
from tinygrad_llm.finetune import classify, instruct, preference
from tinygrad_llm.generate import top_k_filter as library_top_k
from tinygrad_llm.generate import top_p_filter as library_top_p
from tinygrad_llm.optim import AdamW, clip_grad_norm_, lr_at_step
from tinygrad_llm.tokenizers.bpe import merge_pair


def bpe_merge(ids, pair, new_id):
    return merge_pair(ids, tuple(pair), new_id)


class _Ids:
    """A tokenizer whose text already is the token ids."""

    def encode(self, ids, allowed_special=()):
        return ids


def sliding_window_pairs(token_ids, max_length, stride):
    dataset = GPTDatasetV1(token_ids, _Ids(), max_length, stride)
    return dataset.batch(np.arange(len(dataset)))


def softmax_backward(dout, y):
    return F.softmax_backward(dout, (y, -1))[0]


def causal_attention_forward(q, k, v):
    return F.scaled_dot_product_attention_forward(q, k, v, causal=True)[0]


def causal_attention_backward(dout, q, k, v):
    _, cache = F.scaled_dot_product_attention_forward(q, k, v, causal=True)
    return F.scaled_dot_product_attention_backward(dout, cache)


def split_heads(x, num_heads):
    B, T, C = x.shape
    return Tensor(x).reshape(B, T, num_heads, C // num_heads).transpose(1, 2).numpy()


def merge_heads(x):
    B, H, T, D = x.shape
    return Tensor(x).transpose(1, 2).reshape(B, T, H * D).numpy()


def layer_norm_backward(dout, x, scale, eps):
    _, cache = F.layer_norm_forward(x, scale, np.zeros_like(scale), eps)
    return F.layer_norm_backward(dout, cache)


def gelu_backward(dout, x):
    _, cache = F.gelu_forward(x)
    return F.gelu_backward(dout, cache)[0]


def linear_backward(dout, x, weight):
    _, cache = F.linear_forward(x, weight, np.zeros(weight.shape[0]))
    return F.linear_backward(dout, cache)


def cross_entropy_backward(logits, targets):
    _, cache = F.cross_entropy_forward(logits, targets)
    return F.cross_entropy_backward(np.float64(1.0), cache)[0]


def softmax_with_temperature(logits, temperature):
    return F.softmax_forward(logits / temperature)[0]


def top_k_filter(logits, top_k):
    return library_top_k(logits, top_k)


def top_p_filter(logits, top_p):
    return library_top_p(logits, top_p)


def adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    p = Tensor(param.copy(), requires_grad=True)
    p.grad = grad.copy()
    optimizer = AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    optimizer.state[id(p)] = {"step": step - 1, "exp_avg": exp_avg.copy(), "exp_avg_sq": exp_avg_sq.copy()}
    optimizer.step()
    state = optimizer.state[id(p)]
    return p.data, state["exp_avg"], state["exp_avg_sq"]


def warmup_cosine_lr(step, peak_lr, total_steps, warmup_steps, initial_lr, min_lr):
    return lr_at_step(step, peak_lr, total_steps, warmup_steps, initial_lr, min_lr)


def clip_grad_norm(grads, max_norm):
    params = [Tensor(np.zeros_like(g), requires_grad=True) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    total = clip_grad_norm_(params, max_norm)
    return [p.grad for p in params], total


def lora_forward(x, weight, bias, A, B, alpha):
    return F.lora_linear_forward(x, weight, bias, A, B, alpha / A.shape[1])[0]


def lora_backward(dout, x, weight, A, B, alpha):
    _, cache = F.lora_linear_forward(x, weight, None, A, B, alpha / A.shape[1])
    dx, _, _, dA, dB = F.lora_linear_backward(dout, cache, needs_grad=(True, False, False, True, True))
    return dx, dA, dB


class _FixedLogits:
    """A "model" whose output for the batch of rows [[0], [1], ...] is the given logits."""

    device = "cpu"

    def __init__(self, logits):
        self.logits = logits

    def eval(self):
        return self

    def __call__(self, ids):
        return Tensor(self.logits[ids[:, 0]])


def classification_accuracy(logits, labels):
    rows = np.arange(len(logits))[:, None]
    return classify.calc_accuracy_loader([(rows, labels)], _FixedLogits(logits), "cpu")


def masked_collate(batch, pad_token_id, ignore_index, allowed_max_length, instruction_lengths):
    if instruction_lengths is None:
        return instruct.custom_collate_fn(batch, pad_token_id, ignore_index, allowed_max_length)
    return instruct.custom_collate_fn(list(zip(instruction_lengths, batch)), pad_token_id, ignore_index,
                                      allowed_max_length, mask_instruction=True)


def dpo_loss(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs, reference_rejected_logprobs,
             beta):
    out = preference.compute_dpo_loss(Tensor(model_chosen_logprobs), model_rejected_logprobs,
                                      reference_chosen_logprobs, reference_rejected_logprobs, beta)
    return tuple(t.item() for t in out)
