"""PyTorch versions of what tinygrad_llm computes and torch has no single op for.

The tests compare the library against torch's own ops wherever torch has one; the book's
modules and formulas that torch lacks are written here once, in torch, as the book writes
them, so the tests (and the grader) compare against the book rather than against a copy
of the library's own code.
"""
import math

import torch


def layer_norm(x, scale, shift, eps=1e-5):
    """The book's LayerNorm (chapter 4): biased variance, learnable `scale` and `shift`."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return scale * (x - mean) / torch.sqrt(var + eps) + shift


def causal_attention(q, k, v, causal=True, keep=None, dropout_p=0.0):
    """The book's attention on (B, H, T, D) queries and (B, H, S, D) keys and values.

    The causal mask hides keys after each query's own position; with S > T (a KV cache)
    the queries are the last T positions, so query i sits at S - T + i. torch's
    scaled_dot_product_attention aligns the mask top-left instead, hence this version.
    `keep` is the dropout keep-mask (B, H, T, S) applied to the attention weights, scaled
    by 1 / (1 - dropout_p) as nn.Dropout does.
    """
    t_query, t_key = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2)
    if causal:
        hidden = torch.ones(t_query, t_key, dtype=torch.bool).triu(t_key - t_query + 1)
        scores = scores.masked_fill(hidden, -torch.inf)
    weights = torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1)
    if keep is not None:
        weights = weights * keep / (1.0 - dropout_p)
    return weights @ v


def appendix_d_lr(global_step, peak_lr, total_training_steps, warmup_steps, initial_lr, min_lr):
    """The learning rate of the book's appendix-D training loop at `global_step`:
    linear warmup from initial_lr, then cosine annealing from peak_lr down to min_lr."""
    if global_step < warmup_steps:
        lr_increment = (peak_lr - initial_lr) / warmup_steps
        return initial_lr + global_step * lr_increment
    progress = (global_step - warmup_steps) / (total_training_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
