"""Tensor: an array plus the reverse-mode autograd graph that produced it.

Every op makes a new Tensor that remembers its parents and a `backward` closure mapping
the gradient of the output to one gradient per parent (the chain rule, one op at a time).
`Tensor.backward()` walks the graph once in reverse topological order, found with an
explicit stack, so a chain of any length works without recursion.

Gradients are never written in place: where a node is used twice its gradients are added
into a new array, and a leaf's `.grad` is its own array (a view or an array already given
to another leaf is copied), so code may scale `.grad` in place safely.
"""
import contextlib
import functools

import numpy as np

from . import backend

_grad_enabled = True
# When set, backward() calls gradient_hook(node, grad) for every node it reaches, in the order
# it reaches them (tinygrad_llm.viz.gradient_trace sets it for one backward pass).
gradient_hook = None


class no_grad(contextlib.ContextDecorator):
    """Within this block (or decorated function) ops record no graph."""

    def __enter__(self):
        global _grad_enabled
        self._previous, _grad_enabled = _grad_enabled, False

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self._previous


def is_grad_enabled():
    return _grad_enabled


def _graph_freed(_grad):
    raise RuntimeError(
        "backward through a graph whose intermediate values were already freed by an "
        "earlier backward(); call backward(retain_graph=True) the first time to go through it twice"
    )


def _as_array(data, dtype=None, device=None):
    """A backend array: floats keep float32/float64, Python floats take the default dtype."""
    if isinstance(data, Tensor):
        data = data.data
    if backend.device_of(data) == "cuda":
        array = data
    else:
        array = np.asarray(data)
        if dtype is None and array.dtype.kind == "f" and not isinstance(data, (np.ndarray, np.generic)):
            array = array.astype(backend.get_default_dtype())
    if dtype is not None:
        array = array.astype(backend.as_dtype(dtype), copy=False)
    elif array.dtype.kind == "f" and array.dtype not in backend.FLOAT_DTYPES:
        raise TypeError(f"unsupported float dtype {array.dtype}: expected float32 or float64")
    if device is not None:
        array = backend.to_device(array, device)
    return array


def _unbroadcast(grad, shape):
    """Sum a gradient over the axes that broadcasting added or stretched, back to `shape`."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    stretched = tuple(extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1)
    return grad.sum(axis=tuple(range(extra)) + stretched, keepdims=True).reshape(shape)


def _grad(tensor, gradient):
    """gradient() when `tensor` needs one, else None (a constant's is never computed)."""
    return gradient() if tensor.requires_grad else None


def _constant(value):
    """A Tensor that needs no gradient around a scalar or array, as it is (no conversion)."""
    out = Tensor.__new__(Tensor)
    out.data, out.grad, out.requires_grad, out._parents, out._backward, out._op = value, None, False, (), None, ""
    return out


def _check_same_device(*tensors):
    """One op's Tensors all on one device, or a ValueError naming the devices (a scalar constant fits any)."""
    devices = {t.device for t in tensors if t.data.ndim or not isinstance(t.data, np.generic)}
    if len(devices) > 1:
        raise ValueError(f"an op mixes tensors on devices {' and '.join(map(repr, sorted(devices)))}: "
                         "move them to one device first with .to(device)")


def _require_float(tensor, op):
    if tensor.data.dtype.kind != "f":
        raise TypeError(f"{op} needs a float tensor, got {tensor.data.dtype}")


class Tensor:
    # Make `ndarray <op> Tensor` call the Tensor's reflected operator.
    __array_priority__ = 1000

    def __init__(self, data, requires_grad=False, dtype=None, device=None):
        self.data = _as_array(data, dtype, device)
        if requires_grad and self.data.dtype.kind != "f":
            raise TypeError(f"only float tensors can require grad, got {self.data.dtype}")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._parents = ()
        self._backward = None
        self._op = ""

    # ---- graph construction -------------------------------------------------------------

    @staticmethod
    def _make(data, parents, backward, op):
        """The result of an op: records its parents only when a gradient can flow."""
        out = Tensor.__new__(Tensor)
        out.data, out.grad, out._op = data, None, op
        out.requires_grad = _grad_enabled and any(p.requires_grad for p in parents)
        out._parents = parents if out.requires_grad else ()
        out._backward = backward if out.requires_grad else None
        return out

    def _lift(self, other):
        """A Python scalar, array or Tensor as a Tensor beside self (scalars keep self's dtype).

        A scalar stays a NumPy scalar (np.float32(2.0), not a 0-d array): CuPy passes those
        to its kernels by value and refuses NumPy arrays. An array is copied to self's
        device; a Tensor on another device is an error naming both.
        """
        if isinstance(other, Tensor):
            _check_same_device(self, other)
            return other
        if isinstance(other, (int, float)) and self.data.dtype.kind == "f":
            return _constant(self.data.dtype.type(other))
        return Tensor(other, device=self.device)

    def backward(self, grad=None, retain_graph=False):
        if self._backward is _graph_freed:
            _graph_freed(grad)
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (no input requires grad)")
        xp = self.xp
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a scalar output, got shape {self.shape}; "
                    "pass grad= of the same shape"
                )
            grad = xp.ones_like(self.data)
        else:
            grad = _as_array(grad, self.data.dtype, self.device)
            if grad.shape != self.shape:
                raise ValueError(f"backward() grad has shape {grad.shape}, expected {self.shape}")

        grads = {id(self): grad}
        delivered = {id(grad)}  # the caller's `grad` array stays theirs: a leaf gets a copy
        order = _topological_order(self)
        while order:
            # Popping drops the walk's reference, so each intermediate array is freed as soon
            # as its consumers' backward has run (when nothing else holds it).
            node = order.pop()
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if gradient_hook is not None:
                gradient_hook(node, g)
            if node._backward is None:  # a leaf
                if node.grad is None:
                    if g.base is not None or id(g) in delivered:
                        g = g.copy()
                    delivered.add(id(g))
                    node.grad = g
                else:
                    node.grad = node.grad + g
                continue
            if node._backward is _graph_freed:
                _graph_freed(g)
            for parent, parent_grad in zip(node._parents, node._backward(g)):
                if parent_grad is None or not parent.requires_grad:
                    continue
                if parent_grad.dtype != parent.data.dtype:
                    parent_grad = parent_grad.astype(parent.data.dtype)
                key = id(parent)
                grads[key] = parent_grad if key not in grads else grads[key] + parent_grad
            if not retain_graph:
                node._backward, node._parents = _graph_freed, ()

    # ---- array-like properties ----------------------------------------------------------

    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    dtype = property(lambda self: self.data.dtype)
    device = property(lambda self: backend.device_of(self.data))
    xp = property(lambda self: backend.xp_of(self.data))
    is_leaf = property(lambda self: self._backward is None)
    T = property(lambda self: self.transpose(-1, -2))

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.numpy()!r}{grad})"

    def numpy(self):
        return backend.to_host(self.data)

    def item(self):
        return self.numpy().item()

    def detach(self):
        return Tensor(self.data)

    def to(self, device=None, dtype=None):
        """A copy on another device or with another float dtype (a leaf, keeping requires_grad)."""
        data = self.data if device is None else backend.to_device(self.data, device)
        if dtype is not None:
            data = data.astype(backend.as_dtype(dtype), copy=False)
        if data is self.data:
            return self
        return Tensor(data, requires_grad=self.requires_grad)

    # ---- elementwise arithmetic (broadcasting) -----------------------------------------

    def __add__(self, other):
        a, b = self, self._lift(other)
        return Tensor._make(a.data + b.data, (a, b),
                            lambda g: (_grad(a, lambda: _unbroadcast(g, a.shape)),
                                       _grad(b, lambda: _unbroadcast(g, b.shape))), "add")

    def __sub__(self, other):
        a, b = self, self._lift(other)
        return Tensor._make(a.data - b.data, (a, b),
                            lambda g: (_grad(a, lambda: _unbroadcast(g, a.shape)),
                                       _grad(b, lambda: _unbroadcast(-g, b.shape))), "sub")

    def __mul__(self, other):
        a, b = self, self._lift(other)
        # d(ab)/da = b, d(ab)/db = a
        return Tensor._make(a.data * b.data, (a, b),
                            lambda g: (_grad(a, lambda: _unbroadcast(g * b.data, a.shape)),
                                       _grad(b, lambda: _unbroadcast(g * a.data, b.shape))), "mul")

    def __truediv__(self, other):
        a, b = self, self._lift(other)
        out = a.data / b.data
        # d(a/b)/da = 1/b, d(a/b)/db = -a/b^2 = -out/b
        return Tensor._make(out, (a, b),
                            lambda g: (_grad(a, lambda: _unbroadcast(g / b.data, a.shape)),
                                       _grad(b, lambda: _unbroadcast(-g * out / b.data, b.shape))), "div")

    def __neg__(self):
        return Tensor._make(-self.data, (self,), lambda g: (-g,), "neg")

    def __pow__(self, exponent):
        if not isinstance(exponent, (int, float)):
            raise TypeError(f"** takes a Python scalar exponent, got {type(exponent).__name__}")
        _require_float(self, "**")
        a = self
        # d(a^p)/da = p a^(p-1)
        return Tensor._make(a.data ** exponent, (a,), lambda g: (g * exponent * a.data ** (exponent - 1),), "pow")

    def __radd__(self, other):
        return self._lift(other) + self

    def __rsub__(self, other):
        return self._lift(other) - self

    def __rmul__(self, other):
        return self._lift(other) * self

    def __rtruediv__(self, other):
        return self._lift(other) / self

    # ---- matrix product -------------------------------------------------------------------

    def __matmul__(self, other):
        a, b = self, self._lift(other)
        inner_a = a.shape[-1]
        inner_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
        if a.ndim == 0 or b.ndim == 0 or inner_a != inner_b:
            raise ValueError(f"matmul shape mismatch: {a.shape} @ {b.shape} (inner sizes {inner_a} and {inner_b} differ)")
        xp = a.xp
        # Treat vectors as matrices (a row for a, a column for b) so one rule covers all:
        # dA = dOut @ B^T, dB = A^T @ dOut, summed over broadcast batch dimensions.
        a2 = a.data[None, :] if a.ndim == 1 else a.data
        b2 = b.data[:, None] if b.ndim == 1 else b.data
        out2 = xp.matmul(a2, b2)
        squeeze = (-2,) * (a.ndim == 1) + (-1,) * (b.ndim == 1)
        out = out2.squeeze(axis=squeeze) if squeeze else out2

        def backward(g):
            g2 = g.reshape(out2.shape)
            da = _unbroadcast(xp.matmul(g2, b2.swapaxes(-1, -2)), a2.shape).reshape(a.shape)
            db = _unbroadcast(xp.matmul(a2.swapaxes(-1, -2), g2), b2.shape).reshape(b.shape)
            return da, db

        return Tensor._make(out, (a, b), backward, "matmul")

    def __rmatmul__(self, other):
        return self._lift(other) @ self

    # ---- reductions ------------------------------------------------------------------------

    def _expand_reduced(self, g, axis, keepdims):
        """Reshape a reduced gradient so it broadcasts against the input."""
        if axis is None:
            return g.reshape((1,) * self.ndim)
        if keepdims:
            return g
        axes = tuple(ax % self.ndim for ax in (axis if isinstance(axis, tuple) else (axis,)))
        return self.xp.expand_dims(g, axes)

    def sum(self, axis=None, keepdims=False):
        a = self
        # Each input element contributes once to its sum: the gradient is copied back.
        return Tensor._make(a.data.sum(axis=axis, keepdims=keepdims), (a,),
                            lambda g: (a.xp.broadcast_to(a._expand_reduced(g, axis, keepdims), a.shape),), "sum")

    def mean(self, axis=None, keepdims=False):
        axes = range(self.ndim) if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        count = int(np.prod([self.shape[ax] for ax in axes]))
        return self.sum(axis=axis, keepdims=keepdims) / count

    def max(self, axis=None, keepdims=False):
        a = self
        out = a.data.max(axis=axis, keepdims=keepdims)

        def backward(g):
            # The gradient goes to the maxima; tied maxima share it equally.
            winners = a.data == a._expand_reduced(out, axis, keepdims)
            share = winners / winners.sum(axis=axis, keepdims=True)
            return (share.astype(a.dtype) * a._expand_reduced(g, axis, keepdims),)

        return Tensor._make(out, (a,), backward, "max")

    # ---- elementwise functions -------------------------------------------------------------

    def exp(self):
        _require_float(self, "exp")
        out = self.xp.exp(self.data)
        return Tensor._make(out, (self,), lambda g: (g * out,), "exp")

    def log(self):
        _require_float(self, "log")
        a = self
        return Tensor._make(a.xp.log(a.data), (a,), lambda g: (g / a.data,), "log")

    def tanh(self):
        _require_float(self, "tanh")
        out = self.xp.tanh(self.data)
        return Tensor._make(out, (self,), lambda g: (g * (1 - out * out),), "tanh")

    def sqrt(self):
        _require_float(self, "sqrt")
        out = self.xp.sqrt(self.data)
        return Tensor._make(out, (self,), lambda g: (g * 0.5 / out,), "sqrt")

    # ---- shape ops -------------------------------------------------------------------------

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        a = self
        return Tensor._make(a.data.reshape(shape), (a,), lambda g: (g.reshape(a.shape),), "reshape")

    view = reshape

    def transpose(self, dim0, dim1):
        """Swap two axes, like torch.transpose."""
        return Tensor._make(self.data.swapaxes(dim0, dim1), (self,), lambda g: (g.swapaxes(dim0, dim1),), "transpose")

    def permute(self, *dims):
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        inverse = tuple(np.argsort(dims))
        return Tensor._make(self.data.transpose(dims), (self,), lambda g: (g.transpose(inverse),), "permute")

    def __getitem__(self, index):
        a = self
        if isinstance(index, Tensor):
            index = index.data
        elif isinstance(index, tuple):
            index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
        out = a.data[index]
        parts = index if isinstance(index, tuple) else (index,)
        # Integer arrays may pick an element twice; boolean masks and slices never do.
        repeats_possible = any(a.xp.asarray(i).dtype.kind in "iu" and a.xp.ndim(i) > 0
                               for i in parts if not isinstance(i, (slice, type(None), type(Ellipsis))))

        def backward(g):
            grad = a.xp.zeros_like(a.data)
            if repeats_possible:
                a.xp.add.at(grad, index, g)
            else:
                grad[index] = g
            return (grad,)

        return Tensor._make(out, (a,), backward, "getitem")

    def masked_fill(self, mask, value):
        """Elements where `mask` is true replaced by `value` (which gets no gradient)."""
        mask = mask.data if isinstance(mask, Tensor) else mask
        return where(mask, value, self)


def _topological_order(root):
    """Nodes that need a gradient, each after all of its parents (iterative DFS)."""
    order, visited, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p in node._parents if p.requires_grad and id(p) not in visited)
    return order


def tensor(data, requires_grad=False, dtype=None, device=None):
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


def concatenate(tensors, axis=0):
    device = next((t.device for t in tensors if isinstance(t, Tensor)), backend.default_device())
    tensors = [t if isinstance(t, Tensor) else Tensor(t, device=device) for t in tensors]
    _check_same_device(*tensors)
    xp = tensors[0].xp
    out = xp.concatenate([t.data for t in tensors], axis=axis)
    bounds = np.cumsum([t.shape[axis] for t in tensors])[:-1].tolist()
    return Tensor._make(out, tuple(tensors), lambda g: tuple(xp.split(g, bounds, axis=axis)), "concatenate")


cat = concatenate


def split(tensor, sections, axis=0):
    """Pieces along `axis`: `sections` is a piece count (equal sizes) or the split indices."""
    size = tensor.shape[axis]
    if isinstance(sections, int):
        if size % sections:
            raise ValueError(f"split: axis {axis} of size {size} does not divide into {sections} equal pieces")
        bounds = list(range(0, size + 1, size // sections))
    else:
        bounds = [0, *sections, size]
    prefix = (slice(None),) * (axis % tensor.ndim)
    return [tensor[prefix + (slice(lo, hi),)] for lo, hi in zip(bounds[:-1], bounds[1:])]


def where(condition, a, b):
    """Elementwise `a` where `condition` holds, else `b`; each gets the gradient where it was chosen."""
    condition = condition.data if isinstance(condition, Tensor) else condition
    ref = a if isinstance(a, Tensor) else b
    a, b = ref._lift(a), ref._lift(b)
    xp = ref.xp
    condition = backend.to_device(condition, ref.device)
    zero = ref.dtype.type(0)
    out = xp.where(condition, a.data, b.data)
    return Tensor._make(
        out, (a, b),
        lambda g: (_grad(a, lambda: _unbroadcast(xp.where(condition, g, zero), a.shape)),
                   _grad(b, lambda: _unbroadcast(xp.where(condition, zero, g), b.shape))),
        "where")


def fused(forward, backward, name=None, skips_grads=False):
    """Wrap an llm.c-style pair of array functions into one autograd op.

    `forward(*inputs, **options) -> (out, cache)` and `backward(dout, cache) -> grads`,
    one gradient per positional input (None for inputs that take none, such as token
    ids). Inputs may be Tensors, arrays or scalars; only Tensors join the graph.

    With `skips_grads=True` the backward is called as `backward(dout, cache, needs_grad)`:
    `needs_grad[i]` tells whether input i needs a gradient (a Tensor that requires grad),
    so it can skip the work for the others (torch's ctx.needs_input_grad). That is what
    makes freezing pay: the first trainable Linear after a frozen part computes no dx for
    its input, and a frozen weight gets no dW.
    """

    @functools.wraps(forward)
    def op(*inputs, **options):
        _check_same_device(*(x for x in inputs if isinstance(x, Tensor)))
        arrays = [x.data if isinstance(x, Tensor) else x for x in inputs]
        out, cache = forward(*arrays, **options)
        tensor_slots = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]
        needs_grad = tuple(isinstance(x, Tensor) and x.requires_grad for x in inputs)

        def grad_fn(g):
            grads = backward(g, cache, needs_grad) if skips_grads else backward(g, cache)
            return tuple(grads[i] for i in tensor_slots)

        return Tensor._make(out, tuple(inputs[i] for i in tensor_slots), grad_fn, name or forward.__name__)

    return op
