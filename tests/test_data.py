"""The sliding-window loader: the book's numbers on "The Verdict", windows, batches, shuffling."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinygrad_llm as tl
from tinygrad_llm import datasets
from tinygrad_llm.data import GPTDatasetV1, create_dataloader_v1
from tinygrad_llm.tokenizers import get_gpt2_tokenizer

VERDICT = datasets.path("the-verdict").read_text(encoding="utf-8")


class CharTokenizer:
    """One token per character, its code point: a token list of any length is easy to make."""

    def encode(self, text, allowed_special=()):
        return [ord(c) for c in text]


def text_of(n_tokens):
    return "".join(chr(0x4E00 + i) for i in range(n_tokens))  # token i is 0x4E00 + i


def test_the_verdict_has_the_books_5145_tokens():
    assert len(GPTDatasetV1(VERDICT, get_gpt2_tokenizer(), max_length=4, stride=4).token_ids) == 5145


def test_the_books_first_batch():
    loader = create_dataloader_v1(VERDICT, batch_size=8, max_length=4, stride=4, shuffle=False)
    inputs, targets = next(iter(loader))
    assert inputs.dtype == targets.dtype == np.int64
    assert inputs.shape == targets.shape == (8, 4)
    assert inputs[0].tolist() == [40, 367, 2885, 1464]
    assert inputs[:, 0].tolist() == [40, 1807, 10899, 15632, 922, 568, 1049, 284]
    assert targets[-1].tolist() == [3285, 326, 11, 287]
    assert len(loader) == 5141 // 4 // 8


def test_the_books_stride_one_batches():
    batches = iter(create_dataloader_v1(VERDICT, batch_size=1, max_length=4, stride=1, shuffle=False))
    assert [a.tolist() for a in next(batches)] == [[[40, 367, 2885, 1464]], [[367, 2885, 1464, 1807]]]
    assert [a.tolist() for a in next(batches)] == [[[367, 2885, 1464, 1807]], [[2885, 1464, 1807, 3619]]]


@given(n_tokens=st.integers(2, 60), max_length=st.integers(1, 12), stride=st.integers(1, 12),
       batch_size=st.integers(1, 5), drop_last=st.booleans(), shuffle=st.booleans())
def test_every_window_once_per_epoch_with_its_target_one_token_ahead(
        n_tokens, max_length, stride, batch_size, drop_last, shuffle):
    text = text_of(n_tokens)
    try:
        loader = create_dataloader_v1(text, batch_size, max_length, stride, shuffle, drop_last,
                                      seed=0, tokenizer=CharTokenizer())
    except ValueError:  # too short for one window, or for one full batch
        n_windows = len(range(0, n_tokens - max_length, stride))
        assert n_windows == 0 or (drop_last and n_windows < batch_size)
        return
    batches = list(loader)
    assert len(batches) == len(loader)
    starts = range(0, n_tokens - max_length, stride)  # the book's windows
    seen = []
    for inputs, targets in batches:
        assert inputs.shape == targets.shape and inputs.shape[1] == max_length
        assert inputs.shape[0] == batch_size or (not drop_last and inputs is batches[-1][0])
        np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
        seen += [int(row[0]) - 0x4E00 for row in inputs]
        for row, target in zip(inputs, targets):
            start = int(row[0]) - 0x4E00
            assert row.tolist() == [0x4E00 + start + i for i in range(max_length)]
            assert target[-1] == 0x4E00 + start + max_length
    expected = list(starts)[:len(starts) // batch_size * batch_size] if drop_last else list(starts)
    if shuffle and drop_last:  # which windows the last, dropped batch held depends on the order
        assert len(set(seen)) == len(seen) == len(expected) and set(seen) <= set(starts)
    elif shuffle:
        assert sorted(seen) == list(starts)
    else:
        assert seen == expected


def test_no_overlap_when_stride_equals_max_length():
    loader = create_dataloader_v1(text_of(41), batch_size=2, max_length=5, stride=5, shuffle=False,
                                  tokenizer=CharTokenizer())
    inputs = np.concatenate([batch[0] for batch in loader])
    np.testing.assert_array_equal(inputs.ravel(), 0x4E00 + np.arange(40))


def test_shuffle_is_reproducible_with_a_seed_and_differs_between_epochs():
    def epochs(seed, n=2):
        loader = create_dataloader_v1(VERDICT, batch_size=4, max_length=8, stride=8, seed=seed)
        return [[inputs.tolist() for inputs, _ in loader] for _ in range(n)]

    first, second = epochs(seed=123)
    assert epochs(seed=123) == [first, second]
    assert first != second
    assert epochs(seed=124)[0] != first


def test_without_a_seed_shuffling_follows_manual_seed():
    def first_epoch():
        tl.manual_seed(7)
        loader = create_dataloader_v1(VERDICT, batch_size=4, max_length=8, stride=8)
        return [inputs.tolist() for inputs, _ in loader]

    assert first_epoch() == first_epoch()


def test_a_text_too_short_for_one_window_says_how_many_tokens_it_has_and_needs():
    with pytest.raises(ValueError, match="the text has 3 tokens.*max_length=4 needs at least 5"):
        create_dataloader_v1("Hello, world", batch_size=1, max_length=4, stride=1)


def test_drop_last_that_would_leave_no_batch_is_an_error():
    with pytest.raises(ValueError, match="2 windows, fewer than batch_size=4"):
        create_dataloader_v1(text_of(7), batch_size=4, max_length=3, stride=2, tokenizer=CharTokenizer())
    loader = create_dataloader_v1(text_of(7), batch_size=4, max_length=3, stride=2, drop_last=False,
                                  tokenizer=CharTokenizer())
    assert [inputs.shape for inputs, _ in loader] == [(2, 3)]
