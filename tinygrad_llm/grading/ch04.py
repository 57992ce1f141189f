"""Chapter 4 exercises: the backward passes of LayerNorm, GELU and a linear layer."""
import math

import hypothesis.strategies as st
import numpy as np

from .exercise import Exercise, Mistake, Tolerance
from .strategies import batch_shape, side, values

# ---- layer_norm_backward -------------------------------------------------------------------


@st.composite
def _layer_norm_inputs(draw):
    rows = draw(batch_shape(1, 2))
    C = draw(side(1, 6))
    shape = (*rows, C)
    # Rows with an offset far from 0 (up to 1e3) and a spread of at least 0.1 (1/std up to 10),
    # and constant rows, where only eps keeps the division finite.
    x = draw(values(shape)) + draw(st.sampled_from((0.0, 10.0, -1000.0)))
    if draw(st.booleans()) and C > 1:
        x[..., :] = x[..., :1]
    return {"dout": draw(values(shape)), "x": x, "scale": draw(values((C,))),
            "eps": draw(st.sampled_from((1e-5, 1e-3)))}


def _layer_norm_variant(dout, x, scale, eps, ddof=0, mean_term=True, variance_term=True, use_scale=True):
    """LayerNorm's dx with the variance divided by N - ddof, and with terms optionally left out."""
    n = x.shape[-1]
    c = x - x.mean(axis=-1, keepdims=True)
    r = 1 / np.sqrt((c * c).sum(axis=-1, keepdims=True) / (n - ddof) + eps)
    dxhat = dout * scale if use_scale else dout
    dx = r * dxhat
    if mean_term:
        dx = dx - r * dxhat.mean(axis=-1, keepdims=True)
    if variance_term:
        dx = dx - r ** 3 * c * (dxhat * c).sum(axis=-1, keepdims=True) / (n - ddof)
    axes = tuple(range(x.ndim - 1))
    return dx, (dout * c * r).sum(axis=axes), dout.sum(axis=axes)


LAYER_NORM_BACKWARD = Exercise(
    name="layer_norm_backward",
    chapter="chapter 4",
    signature="layer_norm_backward(dout, x, scale, eps) -> (dx, dscale, dshift)",
    task="""
LayerNorm over the last axis (C channels) of x (..., C), with scale and shift of shape (C,):
    mean = sum(x) / C,  var = sum((x - mean)^2) / C   (biased, as torch and the book)
    rstd = 1 / sqrt(var + eps),  xhat = (x - mean) * rstd,  out = xhat * scale + shift
Given dout = dL/dout (same shape as x), return
    dxhat = dout * scale
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))    (means over the last axis, kept)
    dscale = sum of dout * xhat over every axis but the last            (C,)
    dshift = sum of dout over every axis but the last                    (C,)
The two means are how each x moves its row's mean and variance. Rows can sit far from 0
(1000 + small noise): compute the variance from x - mean, not as mean(x^2) - mean^2.
""",
    inputs=_layer_norm_inputs(),
    reference="reference.exercises:layer_norm_backward",
    tolerance=Tolerance(1e-7, 1e-8, "float64; dx is amplified by 1/std (up to 1/sqrt(eps) ~ 300 on "
                                     "constant rows) and rows at 1000 lose their mean's ~1e-13"),
    outputs=("dx", "dscale", "dshift"),
    weight=2,
    mistakes=(
        Mistake("the unbiased variance (divided by C - 1): LayerNorm divides by C",
                lambda dout, x, scale, eps: _layer_norm_variant(dout, x, scale, eps, ddof=1)),
        Mistake("the mean term is missing: each x also moves its row's mean (the - mean(dxhat) term)",
                lambda dout, x, scale, eps: _layer_norm_variant(dout, x, scale, eps, mean_term=False)),
        Mistake("the variance term is missing: each x also moves its row's variance "
                "(the - xhat * mean(dxhat * xhat) term)",
                lambda dout, x, scale, eps: _layer_norm_variant(dout, x, scale, eps, variance_term=False)),
        Mistake("dx forgets the scale: dxhat = dout * scale",
                lambda dout, x, scale, eps: _layer_norm_variant(dout, x, scale, eps, use_scale=False)),
    ),
    error_hints=(("could not be broadcast", "keepdims lost: the per-row means must keep their axis "
                                            "(keepdims=True) to broadcast against the row"),),
)

# ---- gelu_backward ---------------------------------------------------------------------------

_C = math.sqrt(2 / math.pi)
_A = 0.044715


@st.composite
def _gelu_inputs(draw):
    shape = draw(batch_shape(1, 3))
    # Up to +-20: tanh saturates and x^3 is large, where a formula written another way rounds differently.
    bound = draw(st.sampled_from((3.0, 20.0)))
    return {"dout": draw(values(shape)), "x": draw(values(shape, bound))}


def _gelu_tanh_grad(x, inner_derivative=True):
    t = np.tanh(_C * (x + _A * x ** 3))
    du = _C * (1 + 3 * _A * x ** 2) if inner_derivative else _C
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du


def _gelu_exact_grad(x):
    erf = np.vectorize(math.erf)
    return 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


GELU_BACKWARD = Exercise(
    name="gelu_backward",
    chapter="chapter 4",
    signature="gelu_backward(dout, x) -> dx",
    task="""
GPT-2's GELU, the tanh approximation, elementwise:
    gelu(x) = 0.5 x (1 + tanh(u)),  u = c (x + a x^3),  c = sqrt(2 / pi),  a = 0.044715
Given dout = dL/dgelu(x), return dx = dout * gelu'(x), where with t = tanh(u)
    gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2).
""",
    inputs=_gelu_inputs(),
    reference="reference.exercises:gelu_backward",
    tolerance=Tolerance(1e-9, 1e-12, "float64; tanh and the polynomial rounded in another order, "
                                      "a few ulps per element"),
    outputs=("dx",),
    mistakes=(
        Mistake("the chain rule stops short: multiply gelu'(x) by dout",
                lambda dout, x: _gelu_tanh_grad(x)),
        Mistake("the inner derivative du/dx = c (1 + 3 a x^2) is missing its (1 + 3 a x^2)",
                lambda dout, x: dout * _gelu_tanh_grad(x, inner_derivative=False)),
        Mistake("this is the exact GELU's derivative (with erf); GPT-2 uses the tanh approximation",
                lambda dout, x: dout * _gelu_exact_grad(x)),
    ),
)

# ---- linear_backward --------------------------------------------------------------------------


@st.composite
def _linear_inputs(draw):
    rows = draw(batch_shape(1, 3))
    n_in, n_out = draw(side(1, 4)), draw(side(1, 4))
    return {"dout": draw(values((*rows, n_out))), "x": draw(values((*rows, n_in))),
            "weight": draw(values((n_out, n_in)))}


LINEAR_BACKWARD = Exercise(
    name="linear_backward",
    chapter="chapter 4",
    signature="linear_backward(dout, x, weight) -> (dx, dweight, dbias)",
    task="""
A linear layer as torch's: out = x @ weight^T + bias, with x (..., in), weight (out, in),
bias (out,) and out (..., out). Any number of leading axes (a batch, positions) come
before the last. Given dout = dL/dout (..., out), return
    dx = dout @ weight                                   (..., in)
    dweight = sum over every leading position of dout^T x,  i.e. dout2^T @ x2   (out, in)
    dbias = sum of dout over every leading axis          (out,)
where dout2 and x2 are dout and x reshaped to (positions, out) and (positions, in).
""",
    inputs=_linear_inputs(),
    reference="reference.exercises:linear_backward",
    tolerance=Tolerance(1e-10, 1e-12, "float64; sums of up to 64 products in another order"),
    outputs=("dx", "dweight", "dbias"),
    mistakes=(
        Mistake("dx uses the transposed matrix: dx = dout @ weight (weight is (out, in))",
                lambda dout, x, weight: dout @ weight.T, output="dx"),
    ),
    error_hints=(("mismatch", "shapes do not fit a matmul: a transposed matrix? weight is (out, in), "
                              "dx = dout @ weight, dweight = dout^T @ x"),
                 ("not aligned", "shapes do not fit a matmul: a transposed matrix? weight is (out, in), "
                                 "dx = dout @ weight, dweight = dout^T @ x")),
)

EXERCISES = (LAYER_NORM_BACKWARD, GELU_BACKWARD, LINEAR_BACKWARD)
