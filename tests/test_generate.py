"""tl.generate: the KV cache gives the uncached loop's tokens, the filters match torch, eos stops."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tinygrad_llm as tl
from reference import gpt as torch_gpt
from reference import sampling as torch_sampling
from tinygrad_llm.generate import (generate_text_simple, next_token_probabilities, pick_next_token,
                                   text_to_token_ids, token_ids_to_text, top_k_filter, top_p_filter)

# float64 so that the cached and uncached paths (different matmul shapes) cannot round
# differently enough to flip a token; dropout on, to check generation turns it off.
CFG = {"vocab_size": 40, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.5, "qkv_bias": True}


@pytest.fixture(scope="module")
def model():
    return tl.GPTModel(CFG, dtype="float64", seed=7)


PROMPT = np.array([[1, 2, 3], [4, 5, 6]])


def test_greedy_with_and_without_cache_identical_past_the_context(model):
    # 3 + 20 tokens with a context of 8: the window slides for most of the run.
    cached = tl.generate(model, PROMPT, 20, context_size=8)
    uncached = tl.generate(model, PROMPT, 20, context_size=8, use_cache=False)
    assert cached.shape == (2, 23) and cached.dtype == np.int64
    np.testing.assert_array_equal(cached, uncached)
    np.testing.assert_array_equal(cached, generate_text_simple(model, PROMPT, 20, 8))


def test_greedy_matches_the_books_loop_in_torch(model):
    torch_model = torch_gpt.GPTModel(CFG).double().eval()
    torch_gpt.load_into_torch(torch_model, model.state_dict())
    expected = torch_sampling.generate_text_simple(torch_model, torch.tensor(PROMPT), 20, context_size=6)
    np.testing.assert_array_equal(tl.generate(model, PROMPT, 20, context_size=6), expected.numpy())


@pytest.mark.parametrize("context_size", [8, 5])
def test_sampling_with_and_without_cache_identical(model, context_size):
    options = dict(temperature=1.3, top_k=12, top_p=0.9, seed=11)
    cached = tl.generate(model, PROMPT, 20, context_size, **options)
    uncached = tl.generate(model, PROMPT, 20, context_size, use_cache=False, **options)
    np.testing.assert_array_equal(cached, uncached)
    assert not np.array_equal(cached, tl.generate(model, PROMPT, 20, context_size))  # it did sample


def test_prompt_longer_than_the_context(model):
    prompt = np.arange(1, 13)[None]  # 12 tokens, context 8
    np.testing.assert_array_equal(tl.generate(model, prompt, 5, 8), tl.generate(model, prompt, 5, 8, use_cache=False))


def test_cache_feeds_one_token_per_step_until_the_window_slides(model, monkeypatch):
    fed = []
    forward = type(model).forward

    def recording_forward(self, idx, cache=None, logits_at=None):
        # (tokens fed, positions given logits: None is all of them)
        fed.append((np.shape(idx)[1], None if logits_at is None else np.flatnonzero(logits_at[0]).tolist()))
        return forward(self, idx, cache, logits_at)

    monkeypatch.setattr(type(model), "forward", recording_forward)
    tl.generate(model, PROMPT, 8, context_size=6)
    # prompt (3), then one token at a time until 6 are cached, then the whole window each step;
    # a window's head runs on its last position alone
    assert fed == [(3, [2]), (1, None), (1, None), (1, None), (6, [5]), (6, [5]), (6, [5]), (6, [5])]
    fed.clear()
    tl.generate(model, PROMPT, 4, context_size=6, use_cache=False)
    assert fed == [(3, [2]), (4, [3]), (5, [4]), (6, [5])]


@pytest.mark.parametrize("new_tokens, context_size, expected", [(2, 8, 5), (4, 6, 6), (0, 8, 3)])
def test_cache_holds_only_the_positions_the_call_can_fill(model, monkeypatch, new_tokens, context_size, expected):
    # A 3-token prompt and 2 new tokens fill 4 positions: 5 are room enough. With more
    # than the context, the window slides at context_size, as it always has.
    lengths = []
    new_cache = type(model).new_cache
    monkeypatch.setattr(type(model), "new_cache", lambda self, batch, length=None, padding=None: (
        lengths.append(length), new_cache(self, batch, length, padding))[1])
    cached = tl.generate(model, PROMPT, new_tokens, context_size)
    assert lengths[0] == expected
    np.testing.assert_array_equal(cached, tl.generate(model, PROMPT, new_tokens, context_size, use_cache=False))


def test_seed_fixes_the_sample_and_none_uses_manual_seed(model):
    a = tl.generate(model, PROMPT, 10, 8, temperature=1.0, seed=3)
    np.testing.assert_array_equal(a, tl.generate(model, PROMPT, 10, 8, temperature=1.0, seed=3))
    assert not np.array_equal(a, tl.generate(model, PROMPT, 10, 8, temperature=1.0, seed=4))
    tl.manual_seed(5)
    b = tl.generate(model, PROMPT, 10, 8, temperature=1.0)
    tl.manual_seed(5)
    np.testing.assert_array_equal(b, tl.generate(model, PROMPT, 10, 8, temperature=1.0))


def test_eos_stops_and_pads_finished_sequences(model):
    free = tl.generate(model, PROMPT[:1], 10, 8, temperature=1.0, seed=2)[0, 3:]
    eos = int(free[4])
    first = int(np.argmax(free == eos))  # eos may appear before index 4
    stopped = tl.generate(model, PROMPT[:1], 10, 8, temperature=1.0, seed=2, eos_id=eos)
    # as in the book, the eos token ends generation and is not appended
    np.testing.assert_array_equal(stopped[0], np.concatenate([PROMPT[0], free[:first]]))

    batch = tl.generate(model, PROMPT, 10, 8, temperature=1.0, seed=2, eos_id=eos)
    free_batch = tl.generate(model, PROMPT, 10, 8, temperature=1.0, seed=2)
    for row, free_row in zip(batch[:, 3:], free_batch[:, 3:]):
        hits = np.flatnonzero(free_row == eos)
        end = hits[0] if len(hits) else len(free_row)
        np.testing.assert_array_equal(row[:end], free_row[:end])
        assert (row[end:] == eos).all()  # a finished sequence is padded with eos


def test_runs_in_eval_mode_without_a_graph_and_restores_training(model):
    model.train()
    a = tl.generate(model, PROMPT, 6, 8)
    b = tl.generate(model, PROMPT, 6, 8)
    np.testing.assert_array_equal(a, b)  # dropout (p=0.5) was off
    assert model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad, message", [(40, "token id 40"), (-1, "token id -1")])
def test_bad_token_id_raises_naming_it(model, bad, message):
    with pytest.raises(ValueError, match=message):
        tl.generate(model, np.array([[1, bad]]), 3, 8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(context_size=9), r"context_size .* <= 8, got 9"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
    (dict(temperature=-1.0), "temperature"), (dict(max_new_tokens=-1), "max_new_tokens")])
def test_bad_options_raise(model, kwargs, message):
    args = {"max_new_tokens": 3, "context_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        tl.generate(model, PROMPT, **args)


def test_prompt_must_be_a_batch_of_token_ids(model):
    with pytest.raises(ValueError, match="shaped \\(batch, tokens\\)"):
        tl.generate(model, np.array([1, 2, 3]), 3, 8)


# ---- the filters against the torch reference ------------------------------------------------

logit_rows = st.integers(1, 3).flatmap(lambda b: st.integers(1, 12).flatmap(lambda v: st.lists(
    st.lists(st.one_of(st.sampled_from([-1.0, 0.0, 2.0]), st.floats(-8, 8)), min_size=v, max_size=v),
    min_size=b, max_size=b)))
filters = settings(suppress_health_check=[HealthCheck.too_slow])  # example counts: the profile's (conftest)


@filters
@given(rows=logit_rows, data=st.data())
def test_top_k_keeps_what_the_books_top_k_keeps(rows, data):
    logits = np.array(rows)
    top_k = data.draw(st.integers(1, logits.shape[1]))
    expected = torch_sampling.top_k_filter(torch.tensor(logits), top_k).numpy()
    np.testing.assert_array_equal(top_k_filter(logits, top_k), expected)


@filters
@given(rows=logit_rows, top_p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_nucleus(rows, top_p):
    logits = np.array(rows)
    probs = torch.softmax(torch.tensor(logits), dim=-1)
    # Where a token's mass above sits within rounding of top_p, either answer is right.
    assume(np.abs(torch_sampling.mass_above(probs).numpy() - top_p).min() > 1e-9)
    expected = torch_sampling.top_p_filter(torch.tensor(logits), top_p).numpy()
    np.testing.assert_array_equal(top_p_filter(logits, top_p), expected)


def test_top_k_larger_than_the_vocabulary_keeps_everything():
    logits = np.array([[0.5, -1.0, 2.0]])
    np.testing.assert_array_equal(top_k_filter(logits, 10), logits)


def test_sampling_draws_from_the_tempered_filtered_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    n = 20000

    def frequencies(**options):
        draws = pick_next_token(np.repeat(logits, n, axis=0), rng=rng, **options)  # n sequences, one draw each
        return np.bincount(draws, minlength=4) / n

    def expected(weights):
        return np.asarray(weights) / np.sum(weights)

    tolerance = 4 * np.sqrt(0.25 / n)  # four standard deviations of a frequency
    np.testing.assert_allclose(frequencies(temperature=1.0), [0.5, 0.3, 0.15, 0.05], atol=tolerance)
    np.testing.assert_allclose(frequencies(temperature=0.5), expected([0.25, 0.09, 0.0225, 0.0025]), atol=tolerance)
    np.testing.assert_allclose(frequencies(temperature=1.0, top_k=2), expected([0.5, 0.3, 0, 0]), atol=tolerance)
    np.testing.assert_allclose(frequencies(temperature=1.0, top_p=0.7), expected([0.5, 0.3, 0, 0]), atol=tolerance)


# logits at least 0.01 apart, so that no two tokens are (or round to) equally probable
distinct_logit_rows = st.integers(1, 3).flatmap(lambda b: st.integers(1, 12).flatmap(lambda v: st.lists(
    st.lists(st.integers(-800, 800).map(lambda n: n / 100), min_size=v, max_size=v, unique=True),
    min_size=b, max_size=b)))


@filters
@given(rows=distinct_logit_rows, temperature=st.floats(0.1, 5.0), top_p=st.one_of(st.none(), st.floats(0.01, 1.0)),
       data=st.data())
def test_sampling_distribution_is_transformers(rows, temperature, top_p, data):
    # temperature, then top-k, then top-p: transformers' own warpers in its order
    logits = np.array(rows)
    top_k = data.draw(st.one_of(st.none(), st.integers(1, logits.shape[1])))
    expected = torch_sampling.transformers_distribution(torch.tensor(logits), temperature, top_k, top_p)
    if top_p is not None:
        # transformers cuts at cumulative <= 1 - top_p, we at mass above < top_p: the same set unless
        # a token's mass above lies within rounding of top_p (distinct logits: no ties to split).
        before_top_p = torch_sampling.transformers_distribution(torch.tensor(logits), temperature, top_k)
        mass = torch_sampling.mass_above(before_top_p).numpy()[before_top_p.numpy() > 0]
        assume(np.abs(mass - top_p).min() > 1e-9)
    np.testing.assert_allclose(next_token_probabilities(logits, temperature, top_k, top_p), expected.numpy(),
                               rtol=1e-12, atol=1e-15)


def test_top_p_takes_the_nucleus_of_the_tempered_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    # At temperature 2 the probabilities flatten to 0.379 0.294 0.207 0.120: 0.7 needs three tokens,
    # where the untempered distribution reaches it with two (0.5 + 0.3).
    probs = next_token_probabilities(logits, temperature=2.0, top_p=0.7)
    np.testing.assert_array_equal(probs[0] > 0, [True, True, True, False])
    np.testing.assert_array_equal(next_token_probabilities(logits, temperature=1.0, top_p=0.7)[0] > 0,
                                  [True, True, False, False])


# ---- text helpers -----------------------------------------------------------------------------


def test_text_round_trip_through_token_ids():
    from tinygrad_llm.tokenizers import get_gpt2_tokenizer

    tokenizer = get_gpt2_tokenizer()
    ids = text_to_token_ids("Every effort moves you<|endoftext|>", tokenizer)
    np.testing.assert_array_equal(ids, [[6109, 3626, 6100, 345, 50256]])  # the book's ids
    assert ids.dtype == np.int64
    assert token_ids_to_text(ids, tokenizer) == "Every effort moves you<|endoftext|>"
