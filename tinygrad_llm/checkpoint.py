"""Checkpoints: one safetensors file holding everything needed to resume training bit for bit.

Tensors: the model's state dict under `model.<name>` and the optimizer's arrays (AdamW's
moments) under `optimizer.<index>.<name>`. The safetensors header's metadata (a dict of
strings) carries JSON for the rest: the model config, the optimizer's hyperparameters and
step counts, the random generator's state and the caller's metadata (the trainer puts its
data position and loss history there).

safetensors is plain data: reading one never runs code, unlike a pickle. A file that is not
one of our checkpoints is refused with a ValueError naming it. Writes go to a temporary
file in the same folder, are flushed to disk, then renamed over the target, so a crash (even
SIGKILL) mid-save leaves the previous checkpoint intact.
"""
import json
import os
import secrets

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from . import backend

FORMAT = "tinygrad_llm-checkpoint"
VERSION = "1"
# Config keys that change what the weights compute; drop_rate may differ (e.g. fine-tuning).
ARCHITECTURE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights")
# safetensors' dtype names of the arrays a checkpoint holds, as NumPy names.
NUMPY_DTYPES = {"F32": "float32", "F64": "float64"}
TIED_HEAD = "out_head.weight"  # with tie_weights, the same array as tok_emb.weight


def save_checkpoint(path, model, optimizer=None, **metadata):
    """Write model weights, config, optimizer state, rng state and `metadata` (JSON-able) to `path`."""
    path = os.fspath(path)
    state = model.state_dict()
    if model.cfg.get("tie_weights", False):
        del state[TIED_HEAD]  # the token embedding itself: stored once, tied again on loading
    tensors = {f"model.{name}": np.ascontiguousarray(array) for name, array in state.items()}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(model.cfg),
        "rng_state": json.dumps(backend.get_rng_state()),
        "metadata": _to_json(metadata, "metadata"),
    }
    if optimizer is not None:
        optimizer_arrays, header["optimizer"] = _flatten_optimizer(optimizer)
        tensors.update(optimizer_arrays)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_checkpoint(path, model, optimizer=None):
    """Restore weights (and the optimizer state, if given) and the rng state; return the metadata.

    The checkpoint's architecture must match `model.cfg`. With optimizer=None the saved
    optimizer state is ignored (e.g. to generate text from a training checkpoint).
    """
    path = os.fspath(path)
    with _open(path) as f:
        header = f.metadata()
        _check_config(path, json.loads(header["config"]), model.cfg)
        state = {name[len("model."):]: f.get_tensor(name) for name in f.keys() if name.startswith("model.")}
        if model.cfg.get("tie_weights", False) and TIED_HEAD not in state and "tok_emb.weight" in state:
            state[TIED_HEAD] = state["tok_emb.weight"]
        model.load_state_dict(state)
        if optimizer is not None:
            if "optimizer" not in header:
                raise ValueError(f"{path} holds no optimizer state (it was saved with optimizer=None)")
            _load_optimizer(path, optimizer, json.loads(header["optimizer"]), f)
    backend.set_rng_state(json.loads(header["rng_state"]))
    return json.loads(header["metadata"])


def read_checkpoint(path):
    """The header of a checkpoint without loading weights: config, metadata and tensor shapes.

    Returns {"config": dict, "metadata": dict, "optimizer": dict or None,
             "tensors": {name: (shape, NumPy dtype name)}, "file_bytes": int}.
    """
    path = os.fspath(path)
    with _open(path) as f:
        header = f.metadata()
        tensors = {}
        for name in f.keys():
            piece = f.get_slice(name)
            tensors[name] = (tuple(piece.get_shape()), NUMPY_DTYPES.get(piece.get_dtype(), piece.get_dtype()))
    return {
        "config": json.loads(header["config"]),
        "metadata": json.loads(header["metadata"]),
        "optimizer": json.loads(header["optimizer"]) if "optimizer" in header else None,
        "tensors": tensors,
        "file_bytes": os.path.getsize(path),
    }


def model_from_checkpoint(path, dtype=None):
    """A GPTModel built from the checkpoint's config and loaded with its weights, plus the metadata."""
    from .model import GPTModel  # model sits above checkpoint in the import order

    info = read_checkpoint(path)
    if dtype is None:
        dtype = info["tensors"]["model.tok_emb.weight"][1]
    model = GPTModel(info["config"], dtype=dtype, init_weights=False)  # loaded next; draws nothing
    return model, load_checkpoint(path, model)


# ---- reading ------------------------------------------------------------------------------


class _open:
    """safe_open that turns "not a safetensors file" and "not our format" into ValueErrors naming the file."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        try:
            self.file = safe_open(path, framework="np")
        except Exception as error:  # safetensors raises its own error type for a malformed header
            raise ValueError(f"{path} is not a safetensors checkpoint ({error}); "
                             "checkpoints are never unpickled, so pickle files are refused") from None
        header = self.file.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is a safetensors file but not a tinygrad_llm checkpoint "
                             f"(header format {header.get('format')!r}, expected {FORMAT!r})")
        if header.get("version") != VERSION:
            raise ValueError(f"{path} is checkpoint version {header.get('version')!r}; this library reads {VERSION!r}")

    def __enter__(self):
        return self.file.__enter__()

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)


def _check_config(path, saved, cfg):
    differing = [f"{key}: checkpoint {saved.get(key)!r}, model {cfg.get(key)!r}"
                 for key in ARCHITECTURE_KEYS if saved.get(key) != cfg.get(key)]
    if differing:
        raise ValueError(f"{path} was saved from a different architecture ({'; '.join(differing)})")


# ---- the optimizer ------------------------------------------------------------------------


def _flatten_optimizer(optimizer):
    """Arrays as named tensors, everything else (step counts, hyperparameters) as JSON."""
    state_dict = optimizer.state_dict()
    arrays, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        scalars[index] = {}
        for name, value in entries.items():
            if getattr(value, "ndim", 0):
                arrays[f"optimizer.{index}.{name}"] = np.ascontiguousarray(backend.to_host(value))
            else:
                scalars[index][name] = value.item() if hasattr(value, "item") else value
    header = {"type": type(optimizer).__name__, "num_params": len(optimizer.parameters()),
              "param_groups": state_dict["param_groups"], "state": scalars}
    return arrays, _to_json(header, "optimizer state")


def _load_optimizer(path, optimizer, saved, f):
    if saved["type"] != type(optimizer).__name__:
        raise ValueError(f"{path} holds {saved['type']} state, cannot load it into {type(optimizer).__name__}")
    params = optimizer.parameters()
    if saved["num_params"] != len(params) or len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"{path} holds optimizer state for {saved['num_params']} parameters in "
                         f"{len(saved['param_groups'])} groups, the optimizer has {len(params)} in "
                         f"{len(optimizer.param_groups)}")
    state = {int(index): dict(scalars) for index, scalars in saved["state"].items()}
    for name in f.keys():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            array = f.get_tensor(name)
            if array.shape != params[int(index)].shape:
                raise ValueError(f"{path}: optimizer {key} of parameter {index} has shape {array.shape}, "
                                 f"the parameter has {params[int(index)].shape}")
            state[int(index)][key] = array
    groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group for group in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- writing ------------------------------------------------------------------------------


def _to_json(value, what):
    try:
        return json.dumps(value)
    except TypeError as error:
        raise TypeError(f"checkpoint {what} must be JSON-serialisable: {error}") from None


def atomic_write(path, write):
    """Call write(temporary path) beside `path`, fsync, then rename over `path`.

    Readers see the old file or the new one, never half of one, even after SIGKILL.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A random name, so two processes saving at once never write into each other's file.
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
