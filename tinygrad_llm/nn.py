"""Modules: containers of parameters, with torch's names and the book's initialisation."""
import math

import numpy as np

from . import backend
from . import functional as F
from .tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (a leaf that requires grad)."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)


class Module:
    """Parameters and submodules are found from the attributes, in the order they were set.

    A subclass may list `ignored_state_keys`: names of buffers that other code saves in
    its state dicts (the book's attention `mask`) and that `load_state_dict` skips.
    """

    ignored_state_keys = ()
    training = True

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def children(self):
        return ((name, value) for name, value in vars(self).items() if isinstance(value, Module))

    def modules(self, prefix=""):
        """(dotted name, module) for this module and every submodule, depth first."""
        yield prefix, self
        for name, child in self.children():
            yield from child.modules(f"{prefix}{name}.")

    def named_parameters(self, remove_duplicate=True):
        """(dotted name, Parameter) pairs; a parameter shared by two modules comes once unless asked."""
        seen = set()
        for prefix, module in self.modules():
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and (id(value) not in seen or not remove_duplicate):
                    seen.add(id(value))
                    yield prefix + name, value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def state_dict(self):
        """Every parameter name (a shared one under each of its names, as torch) to a host np.ndarray.

        On the CPU the arrays are the parameters' own, as torch's state dict shares storage.
        """
        return {name: backend.to_host(p.data) for name, p in self.named_parameters(remove_duplicate=False)}

    def load_state_dict(self, state_dict):
        """Copy arrays (NumPy, or anything np.asarray takes) into the parameters, checking every key."""
        params = dict(self.named_parameters(remove_duplicate=False))
        ignored = {f"{prefix}{key}" for prefix, module in self.modules() for key in module.ignored_state_keys}
        unknown = [key for key in state_dict if key not in params and key not in ignored]
        if unknown:
            raise KeyError(f"unexpected key(s) in state dict: {', '.join(unknown[:5])}"
                           + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        missing = [key for key in params if key not in state_dict]
        if missing:
            raise KeyError(f"missing key(s) in state dict: {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        values = {}
        for key, p in params.items():
            value = _host_array(state_dict[key])
            if value.dtype.kind != "f":  # casting integers or bytes to weights would load garbage
                raise TypeError(f"{key} has dtype {value.dtype}: weights must be float")
            if value.shape != p.shape:
                raise ValueError(f"shape mismatch for {key}: state dict has {value.shape}, model expects {p.shape}")
            values[key] = value
        for key, p in params.items():
            p.data[...] = backend.to_device(values[key].astype(p.dtype, copy=False), p.device)
        return self

    def train(self, mode=True):
        for _, module in self.modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, device=None, dtype=None):
        """Move every parameter in place (the Parameter objects stay, so optimizers keep working)."""
        for p in self.parameters():
            moved = p.to(device=device, dtype=dtype)
            p.data, p.grad = moved.data, None
        return self

    def num_parameters(self, trainable=False):
        """Parameters (a shared one once); with trainable=True only those with requires_grad, the book's count."""
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable)


def _host_array(value):
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return backend.to_host(value) if backend.device_of(value) == "cuda" else np.asarray(value)


def _generator(rng):
    return backend.generator() if rng is None else rng


UNFILLED = object()
"""Passed as `rng`: the weights are left unfilled (np.empty), for a model whose weights are
loaded next. Drawing them costs seconds at 124M and most of a minute at 1558M."""


def _uniform(rng, bound, shape, dtype):
    if rng is UNFILLED:
        return np.empty(shape, dtype)
    return rng.uniform(-bound, bound, shape).astype(dtype)


class Linear(Module):
    """y = x W^T + b with W of shape (out, in); torch's initialisation U(+-1/sqrt(in))."""

    def __init__(self, in_features, out_features, bias=True, dtype=None, rng=None):
        dtype = backend.get_default_dtype() if dtype is None else backend.as_dtype(dtype)
        rng, bound = _generator(rng), 1.0 / math.sqrt(in_features)
        self.weight = Parameter(_uniform(rng, bound, (out_features, in_features), dtype))
        self.bias = Parameter(_uniform(rng, bound, out_features, dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    """A lookup table of shape (num_embeddings, embedding_dim), initialised N(0, 1) as torch."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, rng=None):
        dtype = backend.get_default_dtype() if dtype is None else backend.as_dtype(dtype)
        rng, shape = _generator(rng), (num_embeddings, embedding_dim)
        self.weight = Parameter(np.empty(shape, dtype) if rng is UNFILLED else rng.standard_normal(shape).astype(dtype))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class LayerNorm(Module):
    """The book's LayerNorm: parameters `scale` (ones) and `shift` (zeros), biased variance."""

    def __init__(self, emb_dim, eps=1e-5, dtype=None):
        dtype = backend.get_default_dtype() if dtype is None else backend.as_dtype(dtype)
        self.eps = eps
        self.scale = Parameter(np.ones(emb_dim, dtype))
        self.shift = Parameter(np.zeros(emb_dim, dtype))

    def forward(self, x):
        return F.layer_norm(x, self.scale, self.shift, self.eps)


class GELU(Module):
    def forward(self, x):
        return F.gelu(x)


class Dropout(Module):
    def __init__(self, p=0.5):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class ModuleList(Module):
    """Submodules named 0, 1, 2, ... (so state-dict keys read `trf_blocks.3.att...`)."""

    def __init__(self, modules=()):
        for module in modules:
            self.append(module)

    def append(self, module):
        setattr(self, str(len(self)), module)
        return self

    def __len__(self):
        return sum(1 for _ in self.children())

    def __iter__(self):
        return (module for _, module in self.children())

    def __getitem__(self, index):
        return list(self)[index]


class Sequential(ModuleList):
    def __init__(self, *modules):
        super().__init__(modules)

    def forward(self, x):
        for module in self:
            x = module(x)
        return x
