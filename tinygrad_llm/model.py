"""The book's GPT (chapter 4), with its class and attribute names, so state dicts move both ways.

GPTModel(cfg) takes the book's config dict. Speed comes from the fused ops (LayerNorm,
GELU, attention and cross-entropy each one op with a hand-written backward; the heads are
strided views of the projections, never copies), from matmuls split over the cores
(tinygrad_llm.cpu), and under `no_grad()` nothing is recorded. For generation, `KVCache`
keeps each layer's keys and values so a new token costs one position's work.
"""
import os

import numpy as np

from . import backend, validation
from . import functional as F
from .nn import UNFILLED, GELU, Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Sequential
from .tensor import Tensor

GPT_CONFIG_124M = {
    "vocab_size": 50257,     # GPT-2's BPE vocabulary
    "context_length": 1024,  # positions the model can attend over
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

# The four GPT-2 sizes (OpenAI's 124M/355M/774M/1558M), as the book's `model_configs`.
GPT2_PRESETS = {
    "gpt2-small": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "gpt2-medium": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "gpt2-large": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "gpt2-xl": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}
GPT2_SIZES = {"124M": "gpt2-small", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}

REQUIRED_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate")


def gpt2_config(name, **overrides):
    """The full config dict of a GPT-2 size ("gpt2-small" ... "gpt2-xl", or "124M" ...)."""
    name = GPT2_SIZES.get(name, name)
    if name not in GPT2_PRESETS:
        raise ValueError(f"unknown GPT-2 preset {name!r}: expected one of {sorted(GPT2_PRESETS) + sorted(GPT2_SIZES)}")
    return {**GPT_CONFIG_124M, **GPT2_PRESETS[name], **overrides}


def check_config(cfg, source="GPT config"):
    """`cfg` itself once every field is of the right type and range; else one error naming the field.

    `source` (a file name, say) begins the message. Keys other than the book's and the
    optional ones below are left alone, for callers that keep their own settings beside.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"{source} must be a dict of the keys of GPT_CONFIG_124M, got {type(cfg).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in cfg]
    if missing:
        raise ValueError(f"{source} is missing {missing}; expected the keys of GPT_CONFIG_124M")
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        validation.integer(f"{source}: {key}", cfg[key], minimum=1)
    validation.number(f"{source}: drop_rate", cfg["drop_rate"], 0.0, 1.0, below=True)
    for key in ("qkv_bias", "tie_weights"):
        if key in cfg:
            validation.boolean(f"{source}: {key}", cfg[key])
    if "layer_norm_eps" in cfg:
        validation.number(f"{source}: layer_norm_eps", cfg["layer_norm_eps"], 0.0, above=True)
    if cfg["emb_dim"] % cfg["n_heads"]:
        raise ValueError(f"{source}: emb_dim {cfg['emb_dim']} must be divisible by n_heads {cfg['n_heads']}")
    return cfg


def check_fits_in_memory(cfg, dtype, source="GPT config"):
    """Refuse a config whose weights alone exceed this machine's memory, before allocating any."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: nothing to compare with
        return
    needed = parameter_counts(cfg, dtype)["megabytes"] * 2**20
    if needed > memory:
        raise ValueError(f"{source} describes a model of {needed / 2**30:,.1f} GiB of {np.dtype(dtype)} weights, "
                         f"more than this machine's {memory / 2**30:,.1f} GiB of memory")


def layer_norm_eps(cfg):
    """The LayerNorms' eps: the optional config key "layer_norm_eps", else the book's (and GPT-2's) 1e-5."""
    return cfg.get("layer_norm_eps", 1e-5)


def parameter_counts(cfg, dtype="float32"):
    """Parameters of GPTModel(cfg) without building it: total, with the output head tied, and MB.

    For GPT_CONFIG_124M: 163,009,536 total, 124,412,160 tied, 621.83 MB in float32 (the book's figures).
    """
    check_config(cfg)
    V, T, C, L = cfg["vocab_size"], cfg["context_length"], cfg["emb_dim"], cfg["n_layers"]
    qkv_bias = 3 * C if cfg.get("qkv_bias", False) else 0
    attention = 3 * C * C + qkv_bias + C * C + C
    feed_forward = C * 4 * C + 4 * C + 4 * C * C + C
    block = attention + feed_forward + 2 * 2 * C
    head = 0 if cfg.get("tie_weights", False) else V * C
    total = V * C + T * C + L * block + 2 * C + head
    tied = total - head
    return {"total": total, "tied": tied,
            "megabytes": total * np.dtype(backend.as_dtype(dtype)).itemsize / (1024 * 1024)}


class KVCache:
    """Keys and values of every layer for the positions seen so far (inference only).

    Arrays are allocated once for `max_length` positions: (layers, B, H, max_length, D).

    A batch of prompts of different lengths is fed left-padded: `padding` (B,) counts the
    pad tokens at the start of each row. A row's first real token then sits at position 0
    (its position embedding is the one it gets alone), and no real token attends to a pad,
    so each row computes what it computes alone.
    """

    def __init__(self, cfg, batch_size, max_length, dtype, device="cpu", padding=None):
        xp = backend.module_for(device)
        head_dim = cfg["emb_dim"] // cfg["n_heads"]
        shape = (cfg["n_layers"], batch_size, cfg["n_heads"], max_length, head_dim)
        self.keys, self.values = xp.empty(shape, dtype), xp.empty(shape, dtype)
        self.reset(padding)

    @property
    def max_length(self):
        return self.keys.shape[3]

    @property
    def batch_size(self):
        return self.keys.shape[1]

    def reset(self, padding=None):
        """Empty the cache; the next sequence fed has `padding` (B,) pad tokens at the left (None: none)."""
        if padding is not None:
            padding = np.asarray(padding, dtype=np.int64)
            if padding.shape != (self.batch_size,) or padding.min() < 0:
                raise ValueError(f"padding must hold one count >= 0 per row ({self.batch_size}), got {padding}")
            if not padding.any():
                padding = None  # no pads: the plain causal attention
        self.padding = padding
        self.length = 0

    def keep_rows(self, rows):
        """Keep only the sequences `rows` (indices into the batch), e.g. once the others are finished."""
        rows = np.asarray(rows)
        on_device = backend.xp_of(self.keys).asarray(rows)
        self.keys, self.values = self.keys[:, on_device], self.values[:, on_device]
        if self.padding is not None:
            self.padding = self.padding[rows]
            if not self.padding.any():
                self.padding = None

    def positions(self, start, end, xp):
        """Position ids of the cache positions [start, end): (end - start,), or (B, end - start) with padding."""
        positions = xp.arange(start, end)
        if self.padding is None:
            return positions
        # A pad takes position 0; its output is never read.
        return xp.maximum(positions[None, :] - xp.asarray(self.padding)[:, None], 0)

    def attention_mask(self, start, end, xp):
        """(B, 1, end - start, end) bool, True where queries [start, end) may not look; None without padding.

        A real query never looks at a pad. A pad's own query keeps its causal keys, so no row
        of attention weights is empty (which would give NaN); nothing reads its output.
        """
        if self.padding is None:
            return None
        padding = xp.asarray(self.padding)[:, None]
        key_is_pad = xp.arange(end)[None, :] < padding  # (B, S)
        query_is_real = xp.arange(start, end)[None, :] >= padding  # (B, T)
        return (key_is_pad[:, None, :] & query_is_real[:, :, None])[:, None]


PACK_AT_MOST = 0.9  # run the blocks on the needed positions alone when they are at most this share


def positions_needed(logits_at):
    """(B, T) bool: each row's positions up to its last one in logits_at (B, T); None when
    those are nearly all of them (PACK_AT_MOST) or none.

    A later position feeds no logit, since attention only looks back, so the blocks may
    skip it: the padding after each entry of an instruction or preference batch, about a
    fifth of the chapter 7 batches' positions. The numbers are the same either way.
    """
    needed = np.logical_or.accumulate(logits_at[:, ::-1], axis=1)[:, ::-1]
    return needed if 0 < needed.sum() <= PACK_AT_MOST * needed.size else None


class MultiHeadAttention(Module):
    # The book registers its causal mask as a buffer; its state dicts carry it, we skip it.
    ignored_state_keys = ("mask",)

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False, dtype=None, rng=None):
        if d_out % num_heads:
            raise ValueError(f"d_out {d_out} must be divisible by num_heads {num_heads}")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.context_length, self.dropout = context_length, dropout
        self.W_query = Linear(d_in, d_out, bias=qkv_bias, dtype=dtype, rng=rng)
        self.W_key = Linear(d_in, d_out, bias=qkv_bias, dtype=dtype, rng=rng)
        self.W_value = Linear(d_in, d_out, bias=qkv_bias, dtype=dtype, rng=rng)
        self.out_proj = Linear(d_out, d_out, dtype=dtype, rng=rng)

    def forward(self, x, cache=None, layer=0, packed=None):
        # x: (B, T, d_in) -> (B, T, d_out). With `packed` a (B, T) bool mask (GPTModel.forward):
        # x (N, d_in) holds only the positions where it is true, -> (N, d_out).
        B, T = x.shape[:2] if packed is None else packed.shape

        def heads(linear):  # -> (B, H, T, D)
            out = linear(x)
            if packed is not None:
                # The skipped positions come after each row's kept ones: no kept query looks at their zeros.
                out = F.unpack_rows(out, packed)
            return out.reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)

        queries, keys, values = heads(self.W_query), heads(self.W_key), heads(self.W_value)
        if cache is None:
            dropout_p = self.dropout if self.training else 0.0
            context = F.scaled_dot_product_attention(queries, keys, values, causal=True, dropout_p=dropout_p)
        else:
            context = Tensor(self._attend_with_cache(queries.data, keys.data, values.data, cache, layer))
        context = context.transpose(1, 2).reshape(B, T, self.d_out)  # heads side by side again
        if packed is not None:
            context = context.reshape(B * T, self.d_out)[packed.reshape(-1)]  # (N, d_out)
        return self.out_proj(context)

    @staticmethod
    def _attend_with_cache(queries, keys, values, cache, layer):
        # Append this step's keys and values at positions [start, end), attend over [0, end).
        start, end = cache.length, cache.length + queries.shape[2]
        cache.keys[layer, :, :, start:end] = keys
        cache.values[layer, :, :, start:end] = values
        keys, values = cache.keys[layer, :, :, :end], cache.values[layer, :, :, :end]
        mask = cache.attention_mask(start, end, backend.xp_of(queries))
        return F.scaled_dot_product_attention_forward(queries, keys, values, causal=True, mask=mask)[0]


class FeedForward(Module):
    def __init__(self, cfg, dtype=None, rng=None):
        C = cfg["emb_dim"]
        self.layers = Sequential(Linear(C, 4 * C, dtype=dtype, rng=rng), GELU(), Linear(4 * C, C, dtype=dtype, rng=rng))

    def forward(self, x):
        return self.layers(x)


class TransformerBlock(Module):
    """Pre-LayerNorm block: x + drop(att(norm1(x))), then x + drop(ff(norm2(x)))."""

    def __init__(self, cfg, dtype=None, rng=None):
        self.att = MultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                                      cfg["n_heads"], cfg.get("qkv_bias", False), dtype=dtype, rng=rng)
        self.ff = FeedForward(cfg, dtype=dtype, rng=rng)
        self.norm1 = LayerNorm(cfg["emb_dim"], eps=layer_norm_eps(cfg), dtype=dtype)
        self.norm2 = LayerNorm(cfg["emb_dim"], eps=layer_norm_eps(cfg), dtype=dtype)
        self.drop_shortcut = Dropout(cfg["drop_rate"])

    def forward(self, x, cache=None, layer=0, packed=None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache, layer, packed))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(Module):
    def __init__(self, cfg, dtype="float32", seed=None, init_weights=True):
        self.cfg = dict(check_config(cfg))
        dtype = backend.as_dtype(dtype)
        check_fits_in_memory(self.cfg, dtype)
        # seed=None draws from tl.manual_seed's generator; a seed gives the same weights every time.
        # init_weights=False draws nothing and leaves the weights unfilled, for loading them next.
        if not init_weights:
            rng = UNFILLED
        else:
            rng = backend.generator() if seed is None else np.random.default_rng(seed)
        self.tok_emb = Embedding(cfg["vocab_size"], cfg["emb_dim"], dtype=dtype, rng=rng)
        self.pos_emb = Embedding(cfg["context_length"], cfg["emb_dim"], dtype=dtype, rng=rng)
        self.drop_emb = Dropout(cfg["drop_rate"])
        self.trf_blocks = ModuleList(TransformerBlock(cfg, dtype=dtype, rng=rng) for _ in range(cfg["n_layers"]))
        self.final_norm = LayerNorm(cfg["emb_dim"], eps=layer_norm_eps(cfg), dtype=dtype)
        self.out_head = Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False, dtype=dtype, rng=rng)
        if cfg.get("tie_weights", False):
            # GPT-2's own weight tying: the output head reuses the token embedding matrix.
            self.out_head.weight = self.tok_emb.weight

    @property
    def dtype(self):
        return self.tok_emb.weight.dtype

    @property
    def device(self):
        return self.tok_emb.weight.device

    @property
    def xp(self):
        return backend.xp_of(self.tok_emb.weight.data)

    def new_cache(self, batch_size, max_length=None, padding=None):
        """An empty KV cache for `batch_size` sequences of up to `max_length` (default: the context) tokens,
        with `padding` (B,) pad tokens at the left of each (see KVCache)."""
        max_length = self.cfg["context_length"] if max_length is None else max_length
        return KVCache(self.cfg, batch_size, max_length, self.dtype, self.device, padding)

    def forward(self, in_idx, cache=None, logits_at=None):
        # in_idx: (B, T) token ids  ->  logits (B, T, vocab_size). Ids on the host stay there
        # until the embedding has checked them, then go to the model's device in one copy.
        # logits_at: an optional (B, T) bool mask; then only the positions where it is true
        # get logits, (N, vocab_size) in row-major order. The head is a third of GPT-2 124M's
        # work per position, and a loss that reads few positions (DPO's responses, the
        # targets that are not padding) needs no head, and no backward of it, anywhere else.
        idx = in_idx.data if isinstance(in_idx, Tensor) else in_idx
        idx = idx if backend.device_of(idx) == "cuda" else np.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"GPTModel expects token ids of shape (batch, sequence), got shape {idx.shape}")
        if 0 in idx.shape:
            raise ValueError(f"GPTModel got an empty batch of token ids, shape {idx.shape}: "
                             "it needs at least one sequence of at least one token")
        start = 0 if cache is None else cache.length
        seq_len = idx.shape[1]
        limit = self.cfg["context_length"] if cache is None else min(self.cfg["context_length"], cache.max_length)
        if start + seq_len > limit:
            raise ValueError(f"sequence of {start + seq_len} tokens is longer than the context length {limit}")
        if cache is not None and cache.keys.shape[1] != idx.shape[0]:
            raise ValueError(f"KV cache holds {cache.keys.shape[1]} sequences, got a batch of {idx.shape[0]}")
        if logits_at is not None:
            logits_at = logits_at.data if isinstance(logits_at, Tensor) else logits_at
            logits_at = logits_at if backend.device_of(logits_at) == "cuda" else np.asarray(logits_at)
            if logits_at.shape != idx.shape or logits_at.dtype != bool:
                raise ValueError(f"logits_at must be a bool mask of the token ids' shape {idx.shape}, "
                                 f"got {logits_at.dtype} of shape {logits_at.shape}")
        tok_embeds = self.tok_emb(idx)  # (B, T, C)
        if cache is None or cache.padding is None:
            pos_embeds = self.pos_emb.weight[start:start + seq_len]  # (T, C): rows of positions known to be valid
        else:  # a left-padded batch: (B, T, C), position ids made on the host and checked there
            pos_embeds = self.pos_emb(cache.positions(start, start + seq_len, np))
        x = self.drop_emb(tok_embeds + pos_embeds)
        host_logits_at = None if logits_at is None else backend.to_host(logits_at)
        needed = None if logits_at is None or cache is not None else positions_needed(host_logits_at)
        packed = None if needed is None else backend.to_device(needed, self.device)
        if packed is not None:
            # The blocks run on the needed positions alone, (N, C); only attention sees the batch
            # (B, T) again. A bool mask picks each row once, so the backward assigns, not adds up.
            x = x.reshape(-1, x.shape[-1])[packed.reshape(-1)]
        for layer, block in enumerate(self.trf_blocks):
            x = block(x, cache, layer, packed)
        if cache is not None:
            cache.length += seq_len
        if logits_at is not None:
            rows = host_logits_at.reshape(-1) if needed is None else host_logits_at[needed]
            x = x.reshape(-1, x.shape[-1])[backend.to_device(rows, self.device)]  # (rows, C); the final norm works row by row
        return self.out_head(self.final_norm(x))
