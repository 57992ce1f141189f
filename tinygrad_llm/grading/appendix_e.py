"""Appendix E exercises: the LoRA layer's forward and backward."""
import hypothesis.strategies as st

from .exercise import Exercise, Mistake, Tolerance
from .strategies import batch_shape, side, values


@st.composite
def _lora_inputs(draw, backward=False):
    rows = draw(batch_shape(1, 2))
    n_in, n_out, rank = draw(side(1, 4)), draw(side(1, 4)), draw(side(1, 3))
    arrays = {"x": draw(values((*rows, n_in))), "weight": draw(values((n_out, n_in)))}
    if not backward:
        arrays["bias"] = draw(values((n_out,)))
    arrays.update(A=draw(values((n_in, rank))), B=draw(values((rank, n_out))),
                  alpha=draw(st.sampled_from((1.0, 8.0, 16.0))))
    if backward:
        arrays = {"dout": draw(values((*rows, n_out))), **arrays}
    return arrays


LORA_FORWARD = Exercise(
    name="lora_forward",
    chapter="appendix E",
    signature="lora_forward(x, weight, bias, A, B, alpha) -> out",
    task="""
The book's LinearWithLoRA: a frozen linear layer plus a low-rank update,
    out = x @ weight^T + bias + (alpha / rank) * (x @ A @ B)
with x (..., in), weight (out, in), bias (out,), A (in, rank), B (rank, out), and
rank = A.shape[1].
""",
    inputs=_lora_inputs(),
    reference="reference.exercises:lora_forward",
    tolerance=Tolerance(1e-10, 1e-12, "float64; three short matmuls in another order"),
    outputs=("out",),
    mistakes=(
        Mistake("the update is scaled by alpha alone (the printed book's first version); the scale is alpha / rank",
                lambda x, weight, bias, A, B, alpha: x @ weight.T + bias + alpha * (x @ A @ B)),
        Mistake("the frozen layer's output x @ weight^T + bias is missing",
                lambda x, weight, bias, A, B, alpha: (alpha / A.shape[1]) * (x @ A @ B)),
        Mistake("the bias is missing",
                lambda x, weight, bias, A, B, alpha: x @ weight.T + (alpha / A.shape[1]) * (x @ A @ B)),
    ),
)


def _lora_backward_variant(dout, x, weight, A, B, alpha, base=True, adapter=True, scaled=True):
    s = alpha / A.shape[1] if scaled else 1.0
    x2, d2 = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
    dx = (dout @ weight if base else 0.0) + (s * (dout @ B.T) @ A.T if adapter else 0.0)
    return dx, s * x2.T @ (d2 @ B.T), s * (x2 @ A).T @ d2


LORA_BACKWARD = Exercise(
    name="lora_backward",
    chapter="appendix E",
    signature="lora_backward(dout, x, weight, A, B, alpha) -> (dx, dA, dB)",
    task="""
The gradients of out = x @ weight^T + bias + s * (x @ A @ B), s = alpha / rank, with the
frozen weight and bias taking none. With dout (..., out) and x2, dout2 the inputs
reshaped to (positions, in) and (positions, out):
    dx = dout @ weight + s * (dout @ B^T) @ A^T          (..., in)
    dA = s * x2^T @ (dout2 @ B^T)                         (in, rank)
    dB = s * (x2 @ A)^T @ dout2                           (rank, out)
""",
    inputs=_lora_inputs(backward=True),
    reference="reference.exercises:lora_backward",
    tolerance=Tolerance(1e-10, 1e-12, "float64; short matmul chains in another order"),
    outputs=("dx", "dA", "dB"),
    weight=2,
    mistakes=(
        Mistake("dx misses the adapter's path s * (dout @ B^T) @ A^T",
                lambda **a: _lora_backward_variant(**a, adapter=False)[0], output="dx"),
        Mistake("dx misses the frozen weight's path dout @ weight (frozen: no dweight, but x still flows through it)",
                lambda **a: _lora_backward_variant(**a, base=False)[0], output="dx"),
        Mistake("the scale alpha / rank is missing from the adapter's gradients",
                lambda **a: _lora_backward_variant(**a, scaled=False)[1], output="dA"),
        Mistake("the scale alpha / rank is missing from the adapter's gradients",
                lambda **a: _lora_backward_variant(**a, scaled=False)[2], output="dB"),
    ),
)

EXERCISES = (LORA_FORWARD, LORA_BACKWARD)
