"""Chapter 6 exercise: a classifier's accuracy from the last position's logits."""
import hypothesis.strategies as st
import numpy as np

from .exercise import Exercise, Mistake, Tolerance
from .strategies import side


@st.composite
def _accuracy_inputs(draw):
    B, T, C = draw(side(1, 4)), draw(side(1, 4)), draw(side(2, 3))
    # Small integers make the argmax of most rows clear, yet ties happen (argmax takes the first).
    logits = np.array(draw(st.lists(st.integers(-3, 3), min_size=B * T * C, max_size=B * T * C)),
                      dtype=np.float64).reshape(B, T, C)
    labels = np.array(draw(st.lists(st.integers(0, C - 1), min_size=B, max_size=B)), dtype=np.int64)
    return {"logits": logits, "labels": labels}


def _accuracy(logits, labels, position=-1, mean=True):
    correct = (logits[:, position, :].argmax(axis=-1) == labels).sum()
    return float(correct / len(labels)) if mean else float(correct)


CLASSIFICATION_ACCURACY = Exercise(
    name="classification_accuracy",
    chapter="chapter 6",
    signature="classification_accuracy(logits, labels) -> accuracy",
    task="""
The book's spam classifier reads the model's output at the last position: logits has
shape (B, T, C) for B texts of T tokens and C classes, labels (B,) integers. The
predicted class of text b is the argmax over the classes of logits[b, -1, :] (the first
of tied maxima, as np.argmax and torch.argmax take it). Return the fraction of texts whose
prediction equals their label, as a float (calc_accuracy_loader's arithmetic for one batch).
""",
    inputs=_accuracy_inputs(),
    reference="reference.exercises:classification_accuracy",
    tolerance=Tolerance(1e-15, 0.0, "a count divided by the batch size: exact up to the division's rounding"),
    outputs=("accuracy",),
    mistakes=(
        Mistake("the first position was read: the last token (logits[:, -1, :]) is the one that has seen the whole text",
                lambda logits, labels: _accuracy(logits, labels, position=0)),
        Mistake("the argmax runs over the wrong axis: take it over the classes (the last axis) at the last position",
                lambda logits, labels: float((logits[:, :, -1].argmax(axis=-1) == labels).mean())),
    ),
)

EXERCISES = (CLASSIFICATION_ACCURACY,)
