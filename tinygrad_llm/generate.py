"""Text generation: the book's greedy loop, top-k / top-p / temperature sampling, and a KV cache.

With the cache, the prompt runs through the model once and each new token then costs one
position's work: every layer appends that token's key and value and attends over the
stored ones. Positions are absolute (GPT-2's learned position embeddings), so once the
sequence outgrows `context_size` the window slides and every kept token moves to a new
position: the cache is then rebuilt from the last `context_size` tokens. That is exactly
what the uncached loop computes, so both give the same tokens.

Prompts of different lengths run as one batch: left-padded, with each row's positions
starting at its first real token and the pads masked out of the attention (KVCache), so
every row gets the tokens it gets alone. A row that reaches eos_id leaves the batch.
"""
import numpy as np

from . import backend, validation
from .functional import check_token_ids
from .tensor import Tensor, no_grad


def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, top_p=None,
             eos_id=None, seed=None, use_cache=True):
    """The prompts followed by the generated tokens.

    idx is a batch of equally long prompts, (B, T0) -> np.ndarray int64 (B, T0 + generated),
    or a list of 1-D prompts of any lengths -> a list of 1-D int64 arrays, each prompt
    followed by its own tokens. A list runs as one left-padded batch with one KV cache
    (see KVCache); each row gets, greedily, the tokens its prompt gets alone.

    temperature 0 picks the most likely token (greedy). Otherwise the logits are divided by
    the temperature, filtered by top-k, then top-p (nucleus), as transformers orders them,
    and sampled from a generator seeded with `seed` (seed=None: tl.manual_seed's generator).
    A sequence stops at `eos_id`; as in the book, that eos token is not appended. In the
    array form a sequence that finished earlier is padded with eos_id; generation ends
    once every sequence has finished. A finished sequence leaves the batch, so it costs
    nothing more.
    """
    if isinstance(idx, (list, tuple)):
        prompts = _check_prompt_list(model, idx, context_size)
        steps = list(generate_stream(model, prompts, max_new_tokens, context_size, temperature, top_k, top_p,
                                     eos_id, seed, use_cache))
        generated = np.stack(steps, axis=1) if steps else np.zeros((len(prompts), 0), np.int64)  # (B, steps)
        return [np.concatenate([prompt, _before_eos(row, eos_id)]) for prompt, row in zip(prompts, generated)]
    idx = _check_prompt(model, idx, context_size)
    steps = generate_stream(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, seed, use_cache)
    return np.concatenate([idx, *(token[:, None] for token in steps)], axis=1)


def generate_stream(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, top_p=None,
                    eos_id=None, seed=None, use_cache=True):
    """Yield the next token of every sequence, (B,) int64, one step at a time (for streaming text).

    idx as for generate: (B, T0) or a list of prompts; a sequence that has finished yields eos_id.
    """
    if isinstance(idx, (list, tuple)):
        tokens, padding = _left_pad(_check_prompt_list(model, idx, context_size))
    else:
        tokens = _check_prompt(model, idx, context_size)
        padding = np.zeros(len(tokens), np.int64)
    _check_options(max_new_tokens, temperature, top_k, top_p)
    rng = backend.generator() if seed is None else np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            yield from _generate(model, tokens, padding, max_new_tokens, context_size, temperature, top_k, top_p,
                                 eos_id, rng, use_cache)
    finally:
        model.train(was_training)


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """The book's chapter 4 loop: feed the last `context_size` tokens, append the argmax, repeat."""
    return generate(model, idx, max_new_tokens, context_size, use_cache=False)


def _generate(model, tokens, padding, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, rng, use_cache):
    # tokens: (B, T) on the host (the model moves what it is fed to its device); row b starts
    # with padding[b] pad tokens. `active` are the rows still generating: a finished row
    # leaves the batch and the cache.
    batch_size = len(tokens)
    active = np.arange(batch_size)
    # The cache holds no more positions than this call can fill (the prompt and every token
    # but the last): its arrays stay small and each row's keys lie close together.
    cache_length = min(context_size, tokens.shape[1] + max_new_tokens)
    cache = model.new_cache(batch_size, cache_length) if use_cache else None
    for _ in range(max_new_tokens):
        if cache is None or cache.length == 0 or cache.length == context_size:
            # No cache, a fresh one, or a full one (the window slides): run the last context_size tokens.
            window = tokens[active, -context_size:]
            window_padding = np.maximum(padding[active] - (tokens.shape[1] - window.shape[1]), 0)
            logits = _run_window(model, window, window_padding, cache)
        else:
            logits = model(tokens[active, -1:], cache=cache)
        logits = backend.to_host(logits.data[:, -1, :])  # (active rows, V)
        if np.isnan(logits).any():
            raise ValueError("the model's logits are NaN: its weights or activations overflowed, "
                             "so no token can be chosen")
        if temperature == 0.0:
            picked = logits.argmax(axis=-1).astype(np.int64)
        else:
            # Sampling works in float64: the nucleus's cumulative sum over 50,257 probabilities keeps its precision.
            logits = logits.astype(np.float64)
            # One uniform number per row of the batch, finished or not: a row's draws do not
            # depend on when the other rows finish.
            uniform = rng.random(batch_size)[active]
            picked = _draw(next_token_probabilities(logits, temperature, top_k, top_p), uniform)
        next_token = np.full(batch_size, 0 if eos_id is None else eos_id, dtype=np.int64)
        next_token[active] = picked
        if eos_id is not None:
            going_on = picked != eos_id
            if not going_on.any():
                return
            if not going_on.all():
                active = active[going_on]
                if cache is not None:
                    cache.keep_rows(np.flatnonzero(going_on))
        tokens = np.concatenate([tokens, next_token[:, None]], axis=1)
        yield next_token


def _run_window(model, window, padding, cache):
    """The last position's logits (B, 1, V) of a window (B, T) whose rows start with `padding`
    pads; a given cache is refilled. Only the last position is sampled from, so the head
    runs on that one alone (`logits_at`), not on all T."""
    last = np.zeros(window.shape, bool)
    last[:, -1] = True
    if cache is not None or padding.any():
        # Pads need the cached path's masked attention: without a cache, a scratch one, filled afresh every step.
        cache = model.new_cache(len(window), window.shape[1]) if cache is None else cache
        cache.reset(padding)
    return model(window, cache=cache, logits_at=last).reshape(len(window), 1, -1)


def _left_pad(prompts):
    """1-D prompts -> (tokens (B, longest) with each prompt at the right, padding (B,) pads at the left)."""
    lengths = np.array([len(prompt) for prompt in prompts])
    tokens = np.zeros((len(prompts), lengths.max()), np.int64)  # the pad id is never attended to
    for row, prompt in zip(tokens, prompts):
        row[len(row) - len(prompt):] = prompt
    return tokens, lengths.max() - lengths


def _before_eos(row, eos_id):
    """A row of generated tokens up to (not including) its first eos_id."""
    if eos_id is None:
        return row
    hits = np.flatnonzero(row == eos_id)
    return row[:hits[0]] if len(hits) else row


def pick_next_token(logits, temperature=0.0, top_k=None, top_p=None, rng=None):
    """The next token of each sequence from its logits (B, V) on the host -> (B,) int64.

    Greedy at temperature 0; else one draw from `rng` (default: tl.manual_seed's
    generator) from next_token_probabilities.
    """
    if temperature == 0.0:
        return logits.argmax(axis=-1).astype(np.int64)
    rng = backend.generator() if rng is None else rng
    return _draw(next_token_probabilities(logits, temperature, top_k, top_p), rng.random(len(logits)))


def next_token_probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution a token is sampled from, (B, V), in transformers' order: the logits
    divided by the temperature, then top-k, then top-p. (Top-k keeps the same tokens at any
    temperature; the nucleus of top-p depends on it.)

    The largest logit is subtracted before dividing (softmax does not change), so a tiny
    temperature sends the others to -inf, which is its limit, greedy, rather than to NaN."""
    with np.errstate(over="ignore"):
        logits = (logits - logits.max(axis=-1, keepdims=True)) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return _softmax(logits)


def _draw(probs, uniform):
    # Inverse-CDF sampling: one uniform number in [0, 1) per sequence, so a seed fixes the whole run.
    cumulative = probs.cumsum(axis=-1)
    u = uniform * cumulative[:, -1]
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
    if idx.ndim != 2 or 0 in idx.shape:
        raise ValueError(f"generate expects a prompt of token ids shaped (batch, tokens) with at least one "
                         f"sequence of at least one token, got shape {idx.shape}")
    idx = check_token_ids(idx, model.cfg["vocab_size"]).astype(np.int64)
    validation.integer("context_size (at most the context length)", context_size, 1,
                       model.cfg["context_length"])
    return idx


def _check_prompt_list(model, prompts, context_size):
    """A list of prompts of any lengths -> a list of checked 1-D int64 arrays."""
    if len(prompts) == 0:
        raise ValueError("generate got an empty list of prompts")
    checked = []
    for i, prompt in enumerate(prompts):
        prompt = np.asarray(backend.to_host(prompt.data if isinstance(prompt, Tensor) else prompt))
        if prompt.ndim != 1 or len(prompt) == 0:
            raise ValueError(f"prompt {i} of the list must be a 1-D sequence of at least one token id, "
                             f"got shape {prompt.shape}")
        checked.append(_check_prompt(model, prompt[None], context_size)[0])
    return checked


def _check_options(max_new_tokens, temperature, top_k, top_p):
    validation.integer("max_new_tokens", max_new_tokens, minimum=0)
    validation.number("temperature (0 means greedy)", temperature, minimum=0.0)
    if top_k is not None:
        validation.integer("top_k (or None)", top_k, minimum=1)
    if top_p is not None:
        validation.number("top_p (or None)", top_p, minimum=0.0, maximum=1.0, above=True)


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
