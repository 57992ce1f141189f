"""Hypothesis strategies the exercises draw their inputs from.

Shapes keep their sides small (1 to 4, size-1 sides common) so that a failing input
shrinks to something a student can read; magnitudes reach the range where a formula
that is not numerically stable overflows (exp of 1000) or cancels.
"""
import hypothesis.strategies as st
import numpy as np
from hypothesis.extra import numpy as hnp

# Multipliers for "large magnitude" draws: exp(1000) overflows float64, exp(30) does not.
MAGNITUDES = (1.0, 30.0, 1000.0)


def side(low=1, high=4):
    return st.integers(low, high)


def values(shape, bound=3.0):
    """float64 arrays of `shape` with elements in [-bound, bound]."""
    return hnp.arrays(np.float64, shape, elements=st.floats(-bound, bound, allow_subnormal=False))


@st.composite
def large(draw, shape, bound=3.0):
    """Values of order 1 scaled by 1, 30 or 1000, plus an offset of the same order per call."""
    scale = draw(st.sampled_from(MAGNITUDES))
    offset = draw(st.floats(-scale, scale))
    return draw(values(shape, bound)) * scale + offset


def batch_shape(min_dims=1, max_dims=3):
    """Leading (batch) shapes: (), (n,), (n, m) ... with sides 1 to 4."""
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=4)


def softmax_rows(x):
    """A stable softmax over the last axis, for strategies that hand out probabilities."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
