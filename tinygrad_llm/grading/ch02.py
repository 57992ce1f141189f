"""Chapter 2 exercises: merging a BPE pair, and the sliding-window (input, target) pairs."""
import hypothesis.strategies as st
import numpy as np

from .exercise import EXACT, Exercise, Mistake

# ---- bpe_merge ---------------------------------------------------------------------------


@st.composite
def _bpe_inputs(draw):
    # A small alphabet makes repeats and overlapping pairs such as (1, 1) in [1, 1, 1] common,
    # and the pair is mostly one that occurs in the ids.
    ids = draw(st.lists(st.integers(0, 2), max_size=12))
    adjacent = list(zip(ids, ids[1:]))
    if adjacent and draw(st.integers(0, 3)):
        pair = draw(st.sampled_from(adjacent))
    else:
        pair = draw(st.tuples(st.integers(0, 2), st.integers(0, 2)))
    return {"ids": ids, "pair": pair, "new_id": 256}


def _merge_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == tuple(pair):
            return ids[:i] + [new_id] + ids[i + 2:]
    return list(ids)


def _merge_right_to_left(ids, pair, new_id):
    out, i = [], len(ids) - 1
    while i >= 0:
        if i >= 1 and (ids[i - 1], ids[i]) == tuple(pair):
            out.append(new_id)
            i -= 2
        else:
            out.append(ids[i])
            i -= 1
    return out[::-1]


def _merge_drops_last(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _merge_no_skip(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new_id)
        else:
            out.append(ids[i])
        i += 1
    return out


BPE_MERGE = Exercise(
    name="bpe_merge",
    chapter="chapter 2",
    signature="bpe_merge(ids, pair, new_id) -> list",
    task="""
Replace every occurrence of the adjacent pair `pair` = (a, b) in the list of token ids
`ids` by `new_id`, scanning left to right: where the pair occurs, emit new_id and skip
both ids; elsewhere copy the id. Overlaps resolve from the left: merging (1, 1) in
[1, 1, 1] gives [new_id, 1]. Return a new list; `ids` may be empty.

This is one step of byte-pair encoding (the BPE tokenizer of chapter 2): training merges
the most frequent pair again and again, encoding applies the learned merges in order.
""",
    inputs=_bpe_inputs(),
    reference="reference.exercises:bpe_merge",
    tolerance=EXACT,
    outputs=("ids",),
    mistakes=(
        Mistake("only the first occurrence was merged: keep scanning after a merge", _merge_first_only),
        Mistake("merged from the right: overlapping pairs resolve from the left ([1, 1, 1] -> [new, 1])",
                _merge_right_to_left),
        Mistake("the last id is lost: the loop stops one short of the end when no pair starts there",
                _merge_drops_last),
        Mistake("after a merge the second id of the pair is copied again: skip both ids (i += 2)", _merge_no_skip),
    ),
)

# ---- sliding_window_pairs --------------------------------------------------------------------


@st.composite
def _window_inputs(draw):
    max_length = draw(st.integers(1, 5))
    stride = draw(st.integers(1, 6))
    token_ids = draw(st.lists(st.integers(0, 50256), min_size=max_length + 1, max_size=max_length + 14))
    return {"token_ids": token_ids, "max_length": max_length, "stride": stride}


def _windows(token_ids, max_length, starts, shift=1):
    ids = np.asarray(token_ids, dtype=np.int64)
    inputs = np.array([ids[i:i + max_length] for i in starts], dtype=np.int64).reshape(-1, max_length)
    targets = np.array([ids[i + shift:i + shift + max_length] for i in starts], dtype=np.int64).reshape(-1, max_length)
    return inputs, targets


def _windows_unshifted(token_ids, max_length, stride):
    return _windows(token_ids, max_length, range(0, len(token_ids) - max_length, stride), shift=0)


def _windows_stride_one(token_ids, max_length, stride):
    return _windows(token_ids, max_length, range(0, len(token_ids) - max_length, 1))


def _windows_one_short(token_ids, max_length, stride):
    return _windows(token_ids, max_length, range(0, len(token_ids) - max_length - 1, stride))


SLIDING_WINDOW_PAIRS = Exercise(
    name="sliding_window_pairs",
    chapter="chapter 2",
    signature="sliding_window_pairs(token_ids, max_length, stride) -> (inputs, targets)",
    task="""
Cut a list of token ids into the book's next-token training pairs (GPTDatasetV1).
Window i starts at s = i * stride, for every s with s + max_length < len(token_ids):
    inputs[i]  = token_ids[s     : s + max_length]
    targets[i] = token_ids[s + 1 : s + max_length + 1]     (the same window, one token later)
so target position t is the token that follows input position t. Return two int64
arrays of shape (number of windows, max_length).
""",
    inputs=_window_inputs(),
    reference="reference.exercises:sliding_window_pairs",
    tolerance=EXACT,
    outputs=("inputs", "targets"),
    mistakes=(
        Mistake("the targets are not shifted: targets[i] starts one token after inputs[i]", _windows_unshifted),
        Mistake("the windows start one token apart: consecutive windows start `stride` tokens apart",
                _windows_stride_one),
        Mistake("one window too few: the last window starts at the largest s with s + max_length < len(token_ids)",
                _windows_one_short),
    ),
    error_hints=(("inhomogeneous", "windows of different lengths: a window runs past the end of the ids "
                                   "(the last start s needs s + max_length < len(token_ids))"),),
)

EXERCISES = (BPE_MERGE, SLIDING_WINDOW_PAIRS)
