"""LoRA (the book's appendix E): low-rank adapters beside a model's frozen Linear layers.

A `LinearWithLoRA` computes linear(x) + (alpha / rank) * x @ A @ B with A (in, rank) and
B (rank, out): only A and B are trained, and B starts at zero, so an adapted model starts
out computing exactly what the base model computes. The forward and backward pass of the
whole thing are one fused op, `functional.lora_linear`.

The scale alpha / rank is the book's current code (appendix-E/01_main-chapter-code); the
printed book multiplied by alpha alone, which equals this code with alpha * rank. Dividing
by the rank lets runs of different ranks share a learning rate.

The book's recipe (2,666,528 trainable parameters on GPT-2 124M with a 2-class head):

    for p in model.parameters():
        p.requires_grad = False
    replace_linear_with_lora(model, rank=16, alpha=16)
    model.num_parameters(trainable=True)

`save_lora` writes the adapters alone (a few MB) as safetensors; `load_lora` puts them
into a model that was given adapters of the same shapes; `merge_lora` folds them into the
weights, leaving plain Linear layers that compute the same outputs.
"""
import json
import math
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from . import backend
from . import functional as F
from .nn import Linear, Module, Parameter

FORMAT = "tinygrad_llm-lora"
VERSION = "1"
FLOAT_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}  # safetensors' names


class LoRALayer(Module):
    """scale * x @ A @ B with scale = alpha / rank; A (in_dim, rank), B (rank, out_dim) zeros.

    A is drawn as the book's `kaiming_uniform_(A, a=sqrt(5))`: torch takes an (in_dim, rank)
    tensor's fan-in from its second dimension, so the bound is
    sqrt(3) * sqrt(2 / (1 + 5)) / sqrt(rank) = 1 / sqrt(rank).
    """

    def __init__(self, in_dim, out_dim, rank, alpha, dtype=None, rng=None):
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
                or not math.isfinite(alpha):
            raise ValueError(f"LoRA alpha must be a finite number, got {alpha!r}")
        dtype = backend.get_default_dtype() if dtype is None else backend.as_dtype(dtype)
        rng = backend.generator() if rng is None else rng
        bound = 1.0 / math.sqrt(rank)
        self.A = Parameter(rng.uniform(-bound, bound, (in_dim, rank)).astype(dtype))
        self.B = Parameter(np.zeros((rank, out_dim), dtype))
        self.rank = int(rank)
        self.alpha = int(alpha) if isinstance(alpha, (int, np.integer)) else float(alpha)

    @property
    def scale(self):
        return self.alpha / self.rank

    def forward(self, x):
        return self.scale * (x @ self.A @ self.B)


class LinearWithLoRA(Module):
    """A Linear (`.linear`, usually frozen) plus a LoRALayer (`.lora`) beside it."""

    def __init__(self, linear, rank, alpha, rng=None):
        out_dim, in_dim = linear.weight.shape
        self.linear = linear
        self.lora = LoRALayer(in_dim, out_dim, rank, alpha, dtype=linear.weight.dtype, rng=rng)
        self.lora.to(device=linear.weight.device)

    # The wrapped layer's weight and bias, read through: code that asks a layer for its
    # shape (a classifier's number of classes) works on an adapted layer too.
    weight = property(lambda self: self.linear.weight)
    bias = property(lambda self: self.linear.bias)

    def forward(self, x):
        # linear(x) + lora(x) in one op: out = x W^T + b + (alpha / rank) (x A) B
        return F.lora_linear(x, self.weight, self.bias, self.lora.A, self.lora.B, self.lora.scale)


def lora_layers(model):
    """{dotted name: LinearWithLoRA} of every adapted layer of `model`, in module order."""
    return {name.rstrip("."): module for name, module in model.modules() if isinstance(module, LinearWithLoRA)}


def replace_linear_with_lora(model, rank, alpha):
    """Replace every Linear inside `model` by a LinearWithLoRA around it, in place (the book's recursion).

    Freeze the model first (the book's order): the adapters' parameters are created
    trainable, the wrapped Linear keeps whatever requires_grad it had.
    """
    adapted = lora_layers(model)
    if adapted:
        raise ValueError(f"the model already has LoRA adapters ({next(iter(adapted))}, ...): "
                         "merge_lora(model) first to add new ones on top of them")
    _replace(model, rank, alpha)


def _replace(module, rank, alpha):
    for name, child in list(module.children()):
        if isinstance(child, Linear):
            setattr(module, name, LinearWithLoRA(child, rank, alpha))
        else:
            _replace(child, rank, alpha)


def merge_lora(model):
    """Fold each adapter into its weight, W + (alpha / rank) (A B)^T, and put the plain Linear back.

    The model computes the same outputs (up to rounding) and is a plain model again, whose
    state dict and checkpoints have the base model's names. Each merged weight is a new
    array, so weights shared with anything else (the caller's state dicts, a tied token
    embedding) are left as they were.
    """
    names_of = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    modules = dict(model.modules())  # the parents of the adapted layers, by their dotted prefix
    untied = False
    for name, layer in lora_layers(model).items():
        linear, lora = layer.linear, layer.lora
        weight = linear.weight
        delta = (lora.A.data @ lora.B.data).T * weight.dtype.type(lora.scale)  # (out, in)
        untied |= len(names_of.get(id(weight), ())) > 1
        linear.weight = Parameter(weight.data + delta, requires_grad=weight.requires_grad)
        parent_name, _, attribute = name.rpartition(".")
        parent = modules[f"{parent_name}." if parent_name else ""]
        setattr(parent, attribute, linear)
    cfg = getattr(model, "cfg", None)
    if untied and isinstance(cfg, dict) and cfg.get("tie_weights", False):
        # The merged output head differs from the token embedding now: a checkpoint must store both.
        cfg["tie_weights"] = False
    return model


# ---- adapters on disk ---------------------------------------------------------------------------


def save_lora(path, model):
    """Write the adapters of `model` alone (A and B of each, with rank and alpha) to a safetensors file.

    The tensor names are the model's state-dict names (`trf_blocks.0.att.W_query.lora.A`, ...),
    which the book's torch model uses too. Nothing else is saved: other trained parameters
    (a head trained in full) need a checkpoint of their own.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save: call replace_linear_with_lora(model, rank, alpha) first")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.lora.A"] = np.ascontiguousarray(backend.to_host(layer.lora.A.data))
        tensors[f"{name}.lora.B"] = np.ascontiguousarray(backend.to_host(layer.lora.B.data))
    adapters = {name: {"rank": layer.lora.rank, "alpha": layer.lora.alpha} for name, layer in layers.items()}
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "version": VERSION, "adapters": json.dumps(adapters)})


def load_lora(path, model):
    """Copy the adapters saved by `save_lora` into `model`, which must have the same adapters.

    Every adapter of the file must exist in the model and the other way round, with the
    same shapes (so the same rank) and the same alpha; the arrays must be floats. Nothing
    is copied unless all of them fit. Returns the model.
    """
    path = os.fspath(path)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"cannot load {path}: the model has no LoRA adapters; "
                         "call replace_linear_with_lora(model, rank, alpha) with the file's rank and alpha first")
    with _open(path) as f:
        saved = json.loads(f.metadata()["adapters"])
        _check_names(path, "adapters", saved, layers)
        expected = [f"{name}.lora.{part}" for name in layers for part in "AB"]
        _check_names(path, "tensors", f.keys(), expected)
        arrays = {}
        for name, layer in layers.items():
            if saved[name]["alpha"] != layer.lora.alpha:
                raise ValueError(f"{path}: adapter {name} was trained with alpha {saved[name]['alpha']}, "
                                 f"the model's has alpha {layer.lora.alpha}")
            for part, param in (("A", layer.lora.A), ("B", layer.lora.B)):
                key = f"{name}.lora.{part}"
                piece = f.get_slice(key)
                if piece.get_dtype() not in FLOAT_DTYPES:
                    raise ValueError(f"{path}: {key} has dtype {piece.get_dtype()}, expected a float "
                                     f"({', '.join(FLOAT_DTYPES)})")
                shape = tuple(piece.get_shape())
                if shape != param.shape:
                    raise ValueError(f"{path}: {key} has shape {shape}, the model's has {param.shape} "
                                     f"(rank {saved[name]['rank']} in the file, {layer.lora.rank} in the model)")
                arrays[key] = (param, f.get_tensor(key))
    for param, array in arrays.values():
        param.data[...] = backend.to_device(array.astype(param.dtype, copy=False), param.device)
    return model


def _check_names(path, what, found, expected):
    found, expected = list(found), list(expected)
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    if missing or extra:
        parts = [f"{label} {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                 for label, names in (("missing from the file:", missing), ("not in the model:", extra)) if names]
        raise ValueError(f"{path} does not fit the model's LoRA {what} ({'; '.join(parts)})")


class _open:
    """safe_open, with "no such file", "not safetensors" and "not LoRA adapters" each said plainly."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LoRA adapter file {path} does not exist")
        try:
            self.file = safe_open(path, framework="np")
        except Exception as error:  # safetensors raises its own error type for a malformed header
            raise ValueError(f"{path} is not a safetensors file ({error}); LoRA adapters are read "
                             "only from safetensors, never unpickled") from None
        header = self.file.metadata() or {}
        if header.get("format") != FORMAT or "adapters" not in header:
            raise ValueError(f"{path} is a safetensors file but not LoRA adapters saved by save_lora "
                             f"(header format {header.get('format')!r}, expected {FORMAT!r})")
        if header.get("version") != VERSION:
            raise ValueError(f"{path} holds LoRA adapters of version {header.get('version')!r}; "
                             f"this library reads {VERSION!r}")

    def __enter__(self):
        return self.file.__enter__()

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)
