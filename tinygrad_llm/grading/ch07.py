"""Chapter 7 exercise: the instruction collate, with its masked targets."""
import hypothesis.strategies as st
import numpy as np

from .exercise import EXACT, Exercise, Mistake

PAD, IGNORE = 50256, -100


@st.composite
def _collate_inputs(draw):
    # Token ids from a few values, the pad among them: a real token may equal the pad id (GPT-2's
    # <|endoftext|> inside a text), which only the position rule, not the value, may mask.
    batch = draw(st.lists(st.lists(st.sampled_from((1, 2, 3, PAD)), min_size=1, max_size=6), min_size=1, max_size=3))
    lengths = draw(st.one_of(st.none(), st.tuples(*(st.integers(1, len(ids)) for ids in batch)).map(list)))
    return {"batch": batch, "pad_token_id": PAD, "ignore_index": IGNORE,
            "allowed_max_length": draw(st.one_of(st.none(), st.integers(1, 6))), "instruction_lengths": lengths}


def _collate(batch, pad_token_id, ignore_index, allowed_max_length, instruction_lengths,
             keep_first_pad=True, extra_pad=True, mask_shift=1):
    longest = max(len(ids) for ids in batch) + (1 if extra_pad else 0)
    padded = np.array([list(ids) + [pad_token_id] * (longest - len(ids)) for ids in batch], dtype=np.int64)
    inputs, targets = padded[:, :-1], padded[:, 1:].copy()
    for row, ids in zip(targets, batch):
        row[len(ids) - 1 + (1 if keep_first_pad else 0):] = ignore_index
    for row, length in zip(targets, instruction_lengths or ()):
        row[:max(length - mask_shift, 0)] = ignore_index
    return inputs[:, :allowed_max_length], targets[:, :allowed_max_length]


MASKED_COLLATE = Exercise(
    name="masked_collate",
    chapter="chapter 7",
    signature="masked_collate(batch, pad_token_id, ignore_index, allowed_max_length, instruction_lengths) "
              "-> (inputs, targets)",
    task="""
The book's instruction-tuning collate (section 7.3, and exercise 7.2's prompt masking).
`batch` is a list of token-id lists. Append one pad_token_id to every item, then pad every
item with pad_token_id to the longest item's length + 1; call the result padded (B, L).
    inputs  = padded[:, :-1]
    targets = padded[:, 1:]
In each row of the targets, every pad after the item's own tokens but the first becomes
ignore_index (the first pad stays: it teaches the model to end its answer). A pad id
inside an item's own tokens is a real token and stays. When instruction_lengths is a list
(one length per item), the first instruction_lengths[i] - 1 targets of row i become
ignore_index too (the positions that predict the prompt). When allowed_max_length is not
None, cut both to their first allowed_max_length positions. Return int64 arrays.
""",
    inputs=_collate_inputs(),
    reference="reference.exercises:masked_collate",
    tolerance=EXACT,
    outputs=("inputs", "targets"),
    weight=2,
    mistakes=(
        Mistake("the first pad of each item must stay a target (the end of the answer); mask only the pads after it",
                lambda **a: _collate(**a, keep_first_pad=False)),
        Mistake("pad to the longest item + 1: every item gets one pad appended before padding",
                lambda **a: _collate(**a, extra_pad=False)),
        Mistake("instruction mask off by one: mask the first instruction_length - 1 targets (the target at "
                "position t is token t + 1)", lambda **a: _collate(**a, mask_shift=0)),
    ),
)

EXERCISES = (MASKED_COLLATE,)
