"""Finite-difference check of an op's hand-written backward, for people writing their own ops."""
import numpy as np

from .tensor import Tensor


def gradcheck(fn, *inputs, eps=1e-6, atol=1e-6, rtol=1e-4, seed=0):
    """Compare the autograd gradients of `fn` with central differences, in float64.

    `fn` maps Tensors to a Tensor. Its output is reduced to a scalar with fixed random
    weights (sum of w * out, so every output element and every Jacobian row counts), and
    each float input's gradient is compared element by element with
    (L(x + eps) - L(x - eps)) / (2 eps), whose error is O(eps^2). Non-float inputs are
    passed through unchanged. Returns True, or raises AssertionError naming the input,
    the element and both values.
    """
    arrays = [np.array(x.numpy() if isinstance(x, Tensor) else x) for x in inputs]
    arrays = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays]
    out = fn(*[Tensor(a) for a in arrays])
    weights = np.random.default_rng(seed).standard_normal(out.shape)

    def loss(values):
        return float((fn(*[Tensor(a) for a in values]).numpy() * weights).sum())

    leaves = [Tensor(a, requires_grad=a.dtype.kind == "f") for a in arrays]
    (fn(*leaves) * weights).sum().backward()
    for position, (leaf, array) in enumerate(zip(leaves, arrays)):
        if array.dtype.kind != "f":
            continue
        analytic = np.zeros_like(array) if leaf.grad is None else np.asarray(leaf.grad)
        for index in np.ndindex(array.shape):
            original = array[index]
            array[index] = original + eps
            upper = loss(arrays)
            array[index] = original - eps
            lower = loss(arrays)
            array[index] = original
            numeric = (upper - lower) / (2 * eps)
            if not np.isclose(analytic[index], numeric, rtol=rtol, atol=atol):
                raise AssertionError(f"gradcheck: input {position} element {index}: "
                                     f"backward gives {analytic[index]!r}, finite differences {numeric!r}")
    return True
