"""Text generation: the book's greedy loop, top-k / top-p / temperature sampling, and a KV cache.

With the cache, the prompt runs through the model once and each new token then costs one
position's work: every layer appends that token's key and value and attends over the
stored ones. Positions are absolute (GPT-2's learned position embeddings), so once the
sequence outgrows `context_size` the window slides and every kept token moves to a new
position: the cache is then rebuilt from the last `context_size` tokens. That is exactly
what the uncached loop computes, so both give the same tokens.
"""
import numpy as np

from . import backend
from .functional import check_token_ids
from .tensor import Tensor, no_grad


def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, top_p=None,
             eos_id=None, seed=None, use_cache=True):
    """The prompt `idx` (B, T0) followed by the generated tokens: np.ndarray int64 (B, T0 + generated).

    temperature 0 picks the most likely token (greedy). Otherwise the logits are filtered
    by top-k, then top-p (nucleus), divided by the temperature and sampled from a
    generator seeded with `seed` (seed=None: tl.manual_seed's generator). Generation stops
    early once every sequence has produced `eos_id`; as in the book, that last eos token is
    not appended, and a sequence that finished earlier is padded with eos_id.
    """
    idx = _check_prompt(model, idx, context_size)
    steps = generate_stream(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, seed, use_cache)
    return np.concatenate([idx, *(token[:, None] for token in steps)], axis=1)


def generate_stream(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, top_p=None,
                    eos_id=None, seed=None, use_cache=True):
    """Yield the next token of every sequence, (B,) int64, one step at a time (for streaming text)."""
    idx = _check_prompt(model, idx, context_size)
    _check_options(max_new_tokens, temperature, top_k, top_p)
    rng = backend.generator() if seed is None else np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            yield from _generate(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, rng, use_cache)
    finally:
        model.train(was_training)


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """The book's chapter 4 loop: feed the last `context_size` tokens, append the argmax, repeat."""
    return generate(model, idx, max_new_tokens, context_size, use_cache=False)


def _generate(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, rng, use_cache):
    tokens = idx  # (B, T) on the host: the model moves what it is fed to its device
    finished = np.zeros(len(idx), dtype=bool)
    cache = model.new_cache(len(idx), context_size) if use_cache else None
    for _ in range(max_new_tokens):
        if cache is None or cache.length == 0 or cache.length == context_size:
            # No cache, a fresh one, or a full one (the window slides): run the last context_size tokens.
            if cache is not None:
                cache.reset()
            logits = model(tokens[:, -context_size:], cache=cache)
        else:
            logits = model(tokens[:, -1:], cache=cache)
        logits = backend.to_host(logits.data[:, -1, :]).astype(np.float64)  # (B, V)
        next_token = pick_next_token(logits, temperature, top_k, top_p, rng)
        if eos_id is not None:
            next_token[finished] = eos_id
            finished |= next_token == eos_id
            if finished.all():
                return
        tokens = np.concatenate([tokens, next_token[:, None]], axis=1)
        yield next_token


def pick_next_token(logits, temperature=0.0, top_k=None, top_p=None, rng=None):
    """The next token of each sequence from its logits (B, V) on the host -> (B,) int64.

    Greedy at temperature 0; else top-k, top-p, temperature, then one draw from `rng`
    (default: tl.manual_seed's generator).
    """
    if temperature == 0.0:
        return logits.argmax(axis=-1).astype(np.int64)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = _softmax(logits / temperature)
    rng = backend.generator() if rng is None else rng
    # Inverse-CDF sampling: one uniform number per sequence, so a seed fixes the whole run.
    cumulative = probs.cumsum(axis=-1)
    u = rng.random(len(probs)) * cumulative[:, -1]
    picked = (cumulative <= u[:, None]).sum(axis=-1)  # the first token whose running sum passes u
    return np.minimum(picked, probs.shape[-1] - 1).astype(np.int64)  # u can round up to the total


def top_k_filter(logits, top_k):
    """The book's top-k: logits below the k-th largest become -inf (ties with it are kept)."""
    top_k = min(top_k, logits.shape[-1])
    kth_largest = np.partition(logits, -top_k, axis=-1)[..., -top_k, None]
    return np.where(logits < kth_largest, -np.inf, logits)


def top_p_filter(logits, top_p):
    """Nucleus filter: keep the most probable tokens whose probabilities first sum to >= top_p.

    The cut-off is the probability of the token that takes the running sum to top_p; tokens
    tied with it are kept too, so the result does not depend on how ties are ordered.
    """
    probs = _softmax(logits)
    descending = -np.sort(-probs, axis=-1)
    reached = descending.cumsum(axis=-1) >= top_p
    # top_p <= 1, yet rounding can leave the total a hair below it: then every token stays.
    last_kept = np.where(reached.any(axis=-1), reached.argmax(axis=-1), probs.shape[-1] - 1)
    cutoff = np.take_along_axis(descending, last_kept[..., None], axis=-1)
    return np.where(probs < cutoff, -np.inf, logits)


def _softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _check_prompt(model, idx, context_size):
    idx = np.asarray(backend.to_host(idx.data if isinstance(idx, Tensor) else idx))
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"generate expects a prompt of token ids shaped (batch, tokens) with at least one token, "
                         f"got shape {idx.shape}")
    idx = check_token_ids(idx, model.cfg["vocab_size"]).astype(np.int64)
    if not 1 <= context_size <= model.cfg["context_length"]:
        raise ValueError(f"context_size {context_size} must be between 1 and the model's context length "
                         f"{model.cfg['context_length']}")
    return idx


def _check_options(max_new_tokens, temperature, top_k, top_p):
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")


# ---- text helpers (the book's chapter 5) -----------------------------------------------------


def text_to_token_ids(text, tokenizer):
    """Text -> token ids of shape (1, T), int64; <|endoftext|> is allowed as in the book."""
    return np.array([tokenizer.encode(text, allowed_special={"<|endoftext|>"})], dtype=np.int64)


def token_ids_to_text(token_ids, tokenizer):
    """Token ids of one sequence ((1, T) or (T,)) -> text."""
    ids = np.asarray(token_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"token_ids_to_text expects one sequence, (T,) or (1, T), got shape {ids.shape}")
    return tokenizer.decode(ids.tolist())
