"""Prompts of different lengths in one batch: each row gets exactly the tokens its prompt gets alone."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygrad_llm as tl

# float64, so that the batch and a prompt alone (different matmul shapes) cannot round
# differently enough to flip a token; dropout on, to check generation turns it off.
CFG = {"vocab_size": 40, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.5, "qkv_bias": True}
PROMPTS = [np.array([5]), np.array([1, 2, 3]), np.array([7, 8, 9, 10, 11, 12]), np.array([3, 4])]


@pytest.fixture(scope="module")
def model():
    return tl.GPTModel(CFG, dtype="float64", seed=7)


def alone(model, prompt, max_new_tokens, context_size=8, **options):
    return tl.generate(model, np.asarray(prompt)[None], max_new_tokens, context_size, **options)[0]


def test_left_padded_forward_gives_each_row_its_own_logits(model):
    longest = max(len(p) for p in PROMPTS)
    tokens = np.zeros((len(PROMPTS), longest), np.int64)
    for row, prompt in zip(tokens, PROMPTS):
        row[longest - len(prompt):] = prompt
    cache = model.new_cache(len(PROMPTS), 8, padding=[longest - len(p) for p in PROMPTS])
    with tl.no_grad():
        model.eval()
        logits = model(tokens, cache=cache).numpy()
        step = model(np.array([[1], [2], [3], [4]]), cache=cache).numpy()  # one more token, cached
        for b, prompt in enumerate(PROMPTS):
            expected = model(prompt[None]).numpy()[0]
            np.testing.assert_allclose(logits[b, longest - len(prompt):], expected, rtol=1e-12, atol=1e-12)
            expected_step = model(np.append(prompt, b + 1)[None]).numpy()[0, -1]
            np.testing.assert_allclose(step[b, -1], expected_step, rtol=1e-12, atol=1e-12)
    model.train()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_rows_equal_each_prompt_alone_past_the_context(model, use_cache):
    # up to 6 + 12 tokens with a context of 8: the window slides, for each row at its own step
    out = tl.generate(model, PROMPTS, 12, context_size=8, use_cache=use_cache)
    assert isinstance(out, list) and len(out) == len(PROMPTS)
    for row, prompt in zip(out, PROMPTS):
        assert row.dtype == np.int64
        np.testing.assert_array_equal(row, alone(model, prompt, 12))


@settings(max_examples=10)
@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=5), context_size=st.integers(3, 8),
       max_new_tokens=st.integers(0, 9), data=st.data())
def test_greedy_batches_of_random_lengths(model, lengths, context_size, max_new_tokens, data):
    prompts = [np.array(data.draw(st.lists(st.integers(0, 39), min_size=n, max_size=n))) for n in lengths]
    out = tl.generate(model, prompts, max_new_tokens, context_size)
    for row, prompt in zip(out, prompts):
        np.testing.assert_array_equal(row, alone(model, prompt, max_new_tokens, context_size))


def test_each_row_stops_at_its_own_eos(model):
    free = [alone(model, p, 12)[len(p):] for p in PROMPTS]
    eos = int(free[1][3])  # a token row 1 generates; other rows may hit it earlier or never
    out = tl.generate(model, PROMPTS, 12, 8, eos_id=eos)
    for row, prompt, free_row in zip(out, PROMPTS, free):
        np.testing.assert_array_equal(row, alone(model, prompt, 12, eos_id=eos))
        hits = np.flatnonzero(free_row == eos)
        end = hits[0] if len(hits) else len(free_row)
        np.testing.assert_array_equal(row, np.concatenate([prompt, free_row[:end]]))  # eos not appended
    assert len(out[1]) == len(PROMPTS[1]) + np.flatnonzero(free[1] == eos)[0]


def test_finished_rows_leave_the_batch(model, monkeypatch):
    free = [alone(model, p, 6)[len(p):] for p in PROMPTS[:2]]
    eos = int(free[0][1])
    assert eos not in free[1][:4]  # row 1 runs on alone (a property of this fixed model and these prompts)
    fed = []
    forward = type(model).forward

    def recording_forward(self, idx, cache=None, logits_at=None):
        fed.append(np.shape(idx)[0])
        return forward(self, idx, cache, logits_at)

    monkeypatch.setattr(type(model), "forward", recording_forward)
    tl.generate(model, PROMPTS[:2], 4, 8, eos_id=eos)
    first = int(np.flatnonzero(free[0] == eos)[0])  # row 0 finishes at this step
    assert fed[:first + 1] == [2] * (first + 1) and fed[first + 1:] == [1] * (len(fed) - first - 1)
    assert len(fed) == 4


def test_array_form_pads_a_finished_row_with_eos(model):
    prompts = np.array([[1, 2, 3], [4, 5, 6]])
    free = tl.generate(model, prompts, 10, 8)[:, 3:]
    eos = int(free[0][2])
    out = tl.generate(model, prompts, 10, 8, eos_id=eos)
    for row, free_row in zip(out[:, 3:], free):
        hits = np.flatnonzero(free_row == eos)
        end = hits[0] if len(hits) else len(free_row)
        np.testing.assert_array_equal(row[:end], free_row[:end])
        assert (row[end:] == eos).all()


def test_sampling_a_batch_is_seeded_and_cache_independent(model):
    options = dict(temperature=1.3, top_k=12, top_p=0.9, seed=11)
    cached = tl.generate(model, PROMPTS, 12, 8, **options)
    uncached = tl.generate(model, PROMPTS, 12, 8, use_cache=False, **options)
    for a, b in zip(cached, uncached):
        np.testing.assert_array_equal(a, b)
    greedy = tl.generate(model, PROMPTS, 12, 8)
    assert any(not np.array_equal(a, g) for a, g in zip(cached, greedy))  # it did sample


def test_a_list_of_equal_prompts_matches_the_array_form(model):
    prompts = np.array([[1, 2, 3], [4, 5, 6]])
    out = tl.generate(model, list(prompts), 7, 8)
    np.testing.assert_array_equal(np.stack(out), tl.generate(model, prompts, 7, 8))


@pytest.mark.parametrize("prompts, message", [
    ([], "empty list of prompts"),
    ([[1, 2], [[1, 2]]], "prompt 1 of the list must be a 1-D"),
    ([[1, 2], []], "prompt 1 of the list must be a 1-D"),
    ([[1, 2], [3, 40]], "token id 40"),
])
def test_bad_prompt_lists_raise_naming_the_prompt(model, prompts, message):
    with pytest.raises(ValueError, match=message):
        tl.generate(model, prompts, 3, 8)
