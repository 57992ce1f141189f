"""The book's GPT (chapter 4) in PyTorch: the twin that tinygrad_llm's GPTModel is checked against.

The same config dict, the same module names and so the same state-dict keys
(`trf_blocks.3.att.W_query.weight`, ...), with the book's causal-mask buffer. Two ways
to compute the same function:

- `fused=False` (the default) is the book's code: attention written out with a masked
  softmax, LayerNorm and GELU from their formulas.
- `fused=True` is torch's fastest eager path, for the benchmark: attention through
  `scaled_dot_product_attention`, LayerNorm and GELU through torch's native kernels.

`to_torch_state_dict` / `from_torch_state_dict` move a state dict between the two
libraries (NumPy arrays one way, torch tensors the other).
"""
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    """Normalise each row to mean 0 and (biased) variance 1, then scale and shift."""

    def __init__(self, emb_dim, fused=False):
        super().__init__()
        self.eps, self.fused = 1e-5, fused
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        if self.fused:
            return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class GELU(nn.Module):
    """GPT-2's tanh approximation of x * Phi(x)."""

    def __init__(self, fused=False):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        if self.fused:
            return F.gelu(x, approximate="tanh")
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class FeedForward(nn.Module):
    def __init__(self, cfg, fused=False):
        super().__init__()
        C = cfg["emb_dim"]
        self.layers = nn.Sequential(nn.Linear(C, 4 * C), GELU(fused), nn.Linear(4 * C, C))

    def forward(self, x):
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, fused=False):
        super().__init__()
        assert d_out % num_heads == 0, "d_out must be divisible by num_heads"
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.fused, self.dropout_p = fused, dropout
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # True above the diagonal: the future positions a query may not attend to.
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        B, T, _ = x.shape

        def heads(linear):  # (B, T, d_out) -> (B, H, T, D)
            return linear(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        queries, keys, values = heads(self.W_query), heads(self.W_key), heads(self.W_value)
        if self.fused:
            dropout_p = self.dropout_p if self.training else 0.0
            context = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=True)
        else:
            scores = queries @ keys.transpose(2, 3)  # (B, H, T, T)
            scores = scores.masked_fill(self.mask.bool()[:T, :T], -torch.inf)
            weights = self.dropout(torch.softmax(scores / self.head_dim ** 0.5, dim=-1))
            context = weights @ values  # (B, H, T, D)
        return self.out_proj(context.transpose(1, 2).reshape(B, T, self.d_out))


class TransformerBlock(nn.Module):
    def __init__(self, cfg, fused=False):
        super().__init__()
        self.att = MultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                      cfg["n_heads"], cfg.get("qkv_bias", False), fused)
        self.ff = FeedForward(cfg, fused)
        self.norm1 = LayerNorm(cfg["emb_dim"], fused)
        self.norm2 = LayerNorm(cfg["emb_dim"], fused)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg, fused=False):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*(TransformerBlock(cfg, fused) for _ in range(cfg["n_layers"])))
        self.final_norm = LayerNorm(cfg["emb_dim"], fused)
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)
        if cfg.get("tie_weights", False):
            self.out_head.weight = self.tok_emb.weight

    def forward(self, in_idx):
        T = in_idx.shape[1]
        x = self.tok_emb(in_idx) + self.pos_emb(torch.arange(T, device=in_idx.device))
        x = self.trf_blocks(self.drop_emb(x))
        return self.out_head(self.final_norm(x))


def to_torch_state_dict(state_dict, dtype=None):
    """tinygrad_llm's state dict (NumPy arrays) as torch tensors (copies), optionally cast."""
    return {key: torch.tensor(np.asarray(value), dtype=dtype) for key, value in state_dict.items()}


def from_torch_state_dict(state_dict):
    """A torch state dict as NumPy arrays (copies), buffers included: tinygrad_llm skips the masks."""
    return {key: value.detach().cpu().numpy().copy() for key, value in state_dict.items()}


def load_into_torch(model, state_dict):
    """Copy tinygrad_llm's state dict into a torch GPTModel, every parameter checked.

    The arrays take the model's dtype. The causal masks are buffers the model builds
    itself, so they are the only keys the state dict may lack.
    """
    dtype = next(model.parameters()).dtype
    missing, unexpected = model.load_state_dict(to_torch_state_dict(state_dict, dtype), strict=False)
    missing = [key for key in missing if not key.endswith(".att.mask")]
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the torch GPTModel: missing {missing}, unexpected {unexpected}")
    return model
