"""Chapter 3 exercises: the softmax's backward, causal attention forward and backward, heads."""
import math

import hypothesis.strategies as st
import numpy as np

from .exercise import Exercise, Mistake, Tolerance
from .strategies import batch_shape, large, side, softmax_rows, values

# ---- softmax_backward ----------------------------------------------------------------------


@st.composite
def _softmax_backward_inputs(draw):
    shape = draw(batch_shape(1, 3))
    # y comes from logits of every magnitude: rows can hold exact zeros and a single 1.
    y = softmax_rows(draw(large(shape)))
    return {"dout": draw(values(shape)), "y": y}


SOFTMAX_BACKWARD = Exercise(
    name="softmax_backward",
    chapter="chapter 3",
    signature="softmax_backward(dout, y) -> dx",
    task="""
y = softmax(x) over the last axis: y_i = exp(x_i) / sum_j exp(x_j). Given y (any shape,
rows along the last axis) and dout = dL/dy of the same shape, return dx = dL/dx.

The Jacobian is dy_i/dx_j = y_i (delta_ij - y_j), so per row
    dx_i = y_i * (dout_i - sum_j dout_j y_j).
The sum runs over the last axis only; keep it as a column so it broadcasts per row.
""",
    inputs=_softmax_backward_inputs(),
    reference="reference.exercises:softmax_backward",
    tolerance=Tolerance(1e-9, 1e-12, "float64; the row sum of dout * y rounds differently in another "
                                      "order (a few ulps times the row length), relative to the largest term"),
    outputs=("dx",),
    mistakes=(
        Mistake("keepdims lost: sum(dout * y) per row must stay a column (axis=-1, keepdims=True); "
                "without it the sums broadcast along the wrong axis",
                lambda dout, y: y * (dout - (dout * y).sum(axis=-1))),
        Mistake("only the diagonal of the Jacobian: the term -y_i sum_j dout_j y_j is missing",
                lambda dout, y: y * dout),
        Mistake("y (1 - y) is the sigmoid's derivative; softmax couples the row: dx = y (dout - sum(dout y))",
                lambda dout, y: dout * y * (1 - y)),
    ),
    error_hints=(("could not be broadcast", "keepdims lost: a per-row sum must keep its axis (keepdims=True) "
                                            "to broadcast against the row"),),
)

# ---- causal attention --------------------------------------------------------------------------


@st.composite
def _qkv(draw, with_dout=False):
    B, H, T, D = draw(side(1, 2)), draw(side(1, 3)), draw(side(1, 4)), draw(side(1, 4))
    shape = (B, H, T, D)
    scale = draw(st.sampled_from((1.0, 1.0, 30.0)))  # scores up to ~1e4 / sqrt(D): exp() overflows unshifted
    arrays = {"q": draw(values(shape)) * scale, "k": draw(values(shape)) * scale, "v": draw(values(shape))}
    if with_dout:
        arrays = {"dout": draw(values(shape)), **arrays}
    return arrays


def _attention(q, k, v, hide_from=1, scale=None, axis=-1):
    """Masked softmax attention; keys j >= i + hide_from are hidden from query i."""
    T, D = q.shape[-2], q.shape[-1]
    scores = q @ np.swapaxes(k, -1, -2) * (1 / math.sqrt(D) if scale is None else scale)
    scores = np.where(np.triu(np.ones((T, T), bool), k=hide_from), -np.inf, scores)
    scores = scores - scores.max(axis=axis, keepdims=True)
    weights = np.exp(scores)
    return (weights / weights.sum(axis=axis, keepdims=True)) @ v


CAUSAL_ATTENTION_FORWARD = Exercise(
    name="causal_attention_forward",
    chapter="chapter 3",
    signature="causal_attention_forward(q, k, v) -> out",
    task="""
Causal scaled dot-product attention over queries, keys and values of shape (B, H, T, D):
    scores = q @ k^T / sqrt(D)                       (B, H, T, T)
    scores[..., i, j] = -inf for every key j > i     (a query sees itself and the past)
    weights = softmax(scores) over the last axis (the keys)
    out = weights @ v                                (B, H, T, D)
Scores can be large (q and k reach about 100): subtract each row's maximum before exp().
""",
    inputs=_qkv(),
    reference="reference.exercises:causal_attention_forward",
    tolerance=Tolerance(1e-9, 1e-11, "float64; softmax normalisation and two matmuls of a few terms "
                                      "each, rounded in another order; scores near 1e4 lose ~1e-12"),
    outputs=("out",),
    weight=2,
    mistakes=(
        Mistake("mask off by one: a query must also see its own position (hide keys j > i, np.triu(..., k=1))",
                lambda q, k, v: _attention(q, k, v, hide_from=0)),
        Mistake("mask off by one: each query sees the next key too; hide keys j > i (np.triu(..., k=1))",
                lambda q, k, v: _attention(q, k, v, hide_from=2)),
        Mistake("no causal mask: keys after the query's position must get weight 0",
                lambda q, k, v: _attention(q, k, v, hide_from=q.shape[-2] + 1)),
        Mistake("the scores are not scaled by 1/sqrt(D)",
                lambda q, k, v: _attention(q, k, v, scale=1.0)),
        Mistake("the scores are scaled by 1/D; the scale is 1/sqrt(D)",
                lambda q, k, v: _attention(q, k, v, scale=1.0 / q.shape[-1])),
        Mistake("softmax over the wrong axis: normalise over the keys (the last axis)",
                lambda q, k, v: _attention(q, k, v, axis=-2)),
    ),
)


def _attention_backward(dout, q, k, v, transposed_dv=False, scale_dq=True, scale_dk=True, full_softmax=True):
    D = q.shape[-1]
    T = q.shape[-2]
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(D)
    s = np.where(np.triu(np.ones((T, T), bool), k=1), -np.inf, s)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dv = (p if transposed_dv else np.swapaxes(p, -1, -2)) @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) if full_softmax else p * dp
    dq = ds @ k / (math.sqrt(D) if scale_dq else 1.0)
    dk = np.swapaxes(ds, -1, -2) @ q / (math.sqrt(D) if scale_dk else 1.0)
    return dq, dk, dv


CAUSAL_ATTENTION_BACKWARD = Exercise(
    name="causal_attention_backward",
    chapter="chapter 3",
    signature="causal_attention_backward(dout, q, k, v) -> (dq, dk, dv)",
    task="""
The gradients of causal attention (see causal_attention_forward) with respect to its
inputs, given dout = dL/dout, all of shape (B, H, T, D). Recompute the weights P, then
    dv = P^T @ dout
    dP = dout @ v^T
    dS = P * (dP - sum(dP * P, over the last axis, kept))     (softmax backward; masked entries have P = 0)
    dq = dS @ k / sqrt(D)
    dk = dS^T @ q / sqrt(D)
where ^T swaps the last two axes.
""",
    inputs=_qkv(with_dout=True),
    reference="reference.exercises:causal_attention_backward",
    tolerance=Tolerance(1e-8, 1e-10, "float64; a chain of matmuls and a softmax backward, whose "
                                      "row sums cancel: absolute error ~1e-13 at gradients of order 1-100"),
    outputs=("dq", "dk", "dv"),
    weight=3,
    mistakes=(
        Mistake("a transposed matrix: dv = P^T @ dout, not P @ dout",
                lambda dout, q, k, v: _attention_backward(dout, q, k, v, transposed_dv=True)),
        Mistake("dq misses the 1/sqrt(D) of the scores",
                lambda dout, q, k, v: _attention_backward(dout, q, k, v, scale_dq=False)),
        Mistake("dk misses the 1/sqrt(D) of the scores",
                lambda dout, q, k, v: _attention_backward(dout, q, k, v, scale_dk=False)),
        Mistake("dq and dk miss the 1/sqrt(D) of the scores",
                lambda dout, q, k, v: _attention_backward(dout, q, k, v, scale_dq=False, scale_dk=False)),
        Mistake("the softmax backward lost its row-sum term: dS = P * (dP - sum(dP * P))",
                lambda dout, q, k, v: _attention_backward(dout, q, k, v, full_softmax=False)),
    ),
)

# ---- split and merge heads ---------------------------------------------------------------------


@st.composite
def _split_inputs(draw):
    B, T, H, D = draw(side(1, 2)), draw(side(1, 4)), draw(side(1, 3)), draw(side(1, 3))
    return {"x": draw(values((B, T, H * D))), "num_heads": H}


@st.composite
def _merge_inputs(draw):
    B, H, T, D = draw(side(1, 2)), draw(side(1, 3)), draw(side(1, 4)), draw(side(1, 3))
    return {"x": draw(values((B, H, T, D)))}


SPLIT_HEADS = Exercise(
    name="split_heads",
    chapter="chapter 3",
    signature="split_heads(x, num_heads) -> heads",
    task="""
Multi-head attention runs H = num_heads attentions side by side on slices of the
channels. Split x of shape (B, T, C) into heads of shape (B, H, T, D), D = C // H: the
channels of head h are x[:, :, h*D:(h+1)*D], so
    heads[b, h, t, :] = x[b, t, h*D:(h+1)*D]
(the book: x.view(B, T, H, D).transpose(1, 2)).
""",
    inputs=_split_inputs(),
    reference="reference.exercises:split_heads",
    tolerance=Tolerance(0.0, 0.0, "a rearrangement: every element is copied exactly"),
    outputs=("heads",),
    mistakes=(
        Mistake("a reshape straight to (B, H, T, D) mixes positions and heads: reshape to (B, T, H, D), "
                "then swap axes 1 and 2",
                lambda x, num_heads: x.reshape(x.shape[0], num_heads, x.shape[1], -1)),
    ),
)

MERGE_HEADS = Exercise(
    name="merge_heads",
    chapter="chapter 3",
    signature="merge_heads(x) -> merged",
    task="""
The inverse of split_heads: heads x of shape (B, H, T, D) back side by side, (B, T, H * D):
    merged[b, t, h*D:(h+1)*D] = x[b, h, t, :]
(the book: context.transpose(1, 2).contiguous().view(B, T, H * D)).
""",
    inputs=_merge_inputs(),
    reference="reference.exercises:merge_heads",
    tolerance=Tolerance(0.0, 0.0, "a rearrangement: every element is copied exactly"),
    outputs=("merged",),
    mistakes=(
        Mistake("a reshape straight to (B, T, H * D) mixes positions and heads: swap axes 1 and 2 first",
                lambda x: x.reshape(x.shape[0], x.shape[2], -1)),
    ),
)

EXERCISES = (SOFTMAX_BACKWARD, CAUSAL_ATTENTION_FORWARD, SPLIT_HEADS, MERGE_HEADS, CAUSAL_ATTENTION_BACKWARD)
