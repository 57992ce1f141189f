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
import re
import secrets

import numpy as np

from . import backend, validation
from .tensor_files import SafetensorsFile

FORMAT = "tinygrad_llm-checkpoint"
VERSION = "1"
# Config keys that change what the weights compute; drop_rate may differ (e.g. fine-tuning).
ARCHITECTURE_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights")
TIED_HEAD = "out_head.weight"  # with tie_weights, the same array as tok_emb.weight


class SaveError(OSError):
    """A file could not be written (a full disk, a read-only folder); the previous file is unchanged."""


def save_checkpoint(path, model, optimizer=None, **metadata):
    """Write model weights, config, optimizer state, rng state and `metadata` (JSON-able) to `path`."""
    from safetensors.numpy import save_file

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
    Everything is checked before anything is written: the header, every tensor's name,
    dtype, shape and values (no NaN/inf), and the optimizer state, so a bad checkpoint
    leaves the model and the optimizer as they were. The tensors are then copied one by
    one from a memory map of the file straight into the parameters.
    """
    path = os.fspath(path)
    file, header = _open(path)
    _check_config(path, header["config"], model.cfg)
    copies = _model_tensors(file, model)
    if optimizer is not None:
        if header["optimizer"] is None:
            raise ValueError(f"{path} holds no optimizer state (it was saved with optimizer=None)")
        optimizer_state = _optimizer_state(file, optimizer, header["optimizer"])
    for name, param in copies:
        file.copy_into(name, param.data)
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    backend.set_rng_state(header["rng_state"])
    return header["metadata"]


def read_checkpoint(path):
    """The header of a checkpoint without loading weights: config, metadata and tensor shapes.

    Returns {"config": dict, "metadata": dict, "optimizer": dict or None,
             "tensors": {name: (shape, NumPy dtype name)}, "file_bytes": int}.
    """
    path = os.fspath(path)
    file, header = _open(path)
    tensors = {name: (file.shape(name), file.dtype_name(name)) for name in file.names()}
    return {**header, "tensors": tensors, "file_bytes": os.path.getsize(path)}


def model_from_checkpoint(path, dtype=None):
    """A GPTModel built from the checkpoint's config and loaded with its weights, plus the metadata."""
    from .model import GPTModel  # model sits above checkpoint in the import order

    info = read_checkpoint(path)
    if dtype is None:  # the checkpoint's own float dtype; float16/bfloat16 weights are computed in float32
        saved = info["tensors"].get("model.tok_emb.weight", (None, "float32"))[1]
        dtype = "float64" if saved == "float64" else "float32"
    model = GPTModel(info["config"], dtype=dtype, init_weights=False)  # loaded next; draws nothing
    return model, load_checkpoint(path, model)


def check_train_state(state, source, batches_per_epoch=None, accumulation_steps=1, num_epochs=None):
    """The training loop's saved position (metadata "train_state"), checked field by field; returns it.

    A tampered or stale state (a negative or huge step, a batch past the epoch's end, a
    history that is not a list of records) is refused naming the field. With
    `batches_per_epoch` (and the run's `accumulation_steps` and `num_epochs`), the position
    must also lie inside this run: batch < batches_per_epoch, epoch <= num_epochs, and the
    step count is what that many epochs and batches make.
    """
    if not isinstance(state, dict):
        raise ValueError(f"{source}: train_state must be a dict, got {type(state).__name__}")
    missing = [key for key in ("step", "epoch", "batch", "seen", "history", "peak_lrs") if key not in state]
    if missing:
        raise ValueError(f"{source}: train_state lacks {missing}")
    for key in ("step", "epoch", "batch", "seen"):
        validation.integer(f"{source}: train_state {key}", state[key], minimum=0)
    validation.number(f"{source}: train_state seconds", state.get("seconds", 0.0), minimum=0.0)
    if not isinstance(state["history"], list) or not all(isinstance(record, dict) and isinstance(record.get("event"), str)
                                                         for record in state["history"]):
        raise ValueError(f"{source}: train_state history must be a list of records")
    if not isinstance(state["peak_lrs"], list) or not state["peak_lrs"]:
        raise ValueError(f"{source}: train_state peak_lrs must be a list of learning rates")
    for lr in state["peak_lrs"]:
        validation.number(f"{source}: train_state peak_lrs", lr, minimum=0.0)
    for key in ("generators", "epoch_generators"):
        generators = state.get(key)
        if generators is not None:
            if not isinstance(generators, dict) or "global" not in generators:
                raise ValueError(f"{source}: train_state {key} must hold the generators' states")
            for name, generator_state in generators.items():
                _check_rng_state(generator_state, f"{source}: train_state {key} {name}")
    if batches_per_epoch is not None:
        steps_per_epoch = -(-batches_per_epoch // accumulation_steps)
        if state["batch"] >= batches_per_epoch:
            raise ValueError(f"{source}: train_state batch {state['batch']} is past the end of an epoch of "
                             f"{batches_per_epoch} batches: the checkpoint was saved for other data or batch size")
        if num_epochs is not None and (state["epoch"] > num_epochs or (state["epoch"] == num_epochs and state["batch"])):
            raise ValueError(f"{source}: train_state epoch {state['epoch']} is past the run's {num_epochs} epochs")
        expected_step = state["epoch"] * steps_per_epoch + -(-state["batch"] // accumulation_steps)
        if state["step"] != expected_step:
            raise ValueError(f"{source}: train_state step {state['step']} does not match epoch {state['epoch']} and "
                             f"batch {state['batch']} with {batches_per_epoch} batches per epoch")
        if state["batch"] > 0 and state.get("epoch_generators") is None:
            raise ValueError(f"{source}: train_state stops mid-epoch but lacks the epoch's generator states")
    return state


# ---- reading ------------------------------------------------------------------------------


def _open(path):
    """(SafetensorsFile, header) of a checkpoint, its header checked: our format, valid JSON fields.

    The header's config, rng_state and metadata are required, optimizer optional; each is
    parsed and checked here, once, for every reader (load, read_checkpoint, info).
    """
    file = SafetensorsFile(path, "checkpoint")
    header = file.metadata
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a tinygrad_llm checkpoint "
                         f"(header format {header.get('format')!r}, expected {FORMAT!r})")
    if header.get("version") != VERSION:
        raise ValueError(f"{path} is checkpoint version {header.get('version')!r}; this library reads {VERSION!r}")
    missing = [key for key in ("config", "rng_state", "metadata") if key not in header]
    if missing:
        raise ValueError(f"{path}: the checkpoint header lacks {missing}, which every checkpoint holds: "
                         "the file was damaged or not written by save_checkpoint")
    parsed = {key: _from_json(path, header, key) for key in ("config", "rng_state", "metadata")}
    parsed["optimizer"] = _from_json(path, header, "optimizer") if "optimizer" in header else None
    for key in ("config", "metadata") + (("optimizer",) if parsed["optimizer"] is not None else ()):
        if not isinstance(parsed[key], dict):
            raise ValueError(f"{path}: the checkpoint's {key} must be a JSON object, got {type(parsed[key]).__name__}")
    from .model import check_config  # model sits above checkpoint in the import order

    check_config(parsed["config"], source=f"{path}: config")
    _check_rng_state(parsed["rng_state"], f"{path}: rng_state")
    return file, parsed


def _from_json(path, header, key):
    try:
        return json.loads(header[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the checkpoint's {key} is not valid JSON ({error})") from None


def _check_rng_state(state, source):
    """A random generator's saved state, checked by giving it to a scratch generator of its kind."""
    try:
        generator = getattr(np.random, state["bit_generator"])()
        generator.state = state
    except (TypeError, KeyError, ValueError, AttributeError):
        raise ValueError(f"{source} is not the state of a NumPy random generator") from None


def _check_config(path, saved, cfg):
    differing = [f"{key}: checkpoint {saved.get(key)!r}, model {cfg.get(key)!r}"
                 for key in ARCHITECTURE_KEYS if saved.get(key) != cfg.get(key)]
    if differing:
        raise ValueError(f"{path} was saved from a different architecture ({'; '.join(differing)})")


def _model_tensors(file, model):
    """[(tensor name, parameter)] once every tensor is checked: names, dtypes, shapes, values."""
    params = dict(model.named_parameters())  # a tied head is listed once, as tok_emb.weight
    names = {name[len("model."):] for name in file.names() if name.startswith("model.")}
    missing = [name for name in params if name not in names]
    tied_extra = {TIED_HEAD} if model.cfg.get("tie_weights", False) else set()  # older files stored it twice
    unexpected = sorted(names - set(params) - tied_extra)
    if missing or unexpected:
        raise ValueError(f"{file.path} does not hold this model's weights: "
                         + "; ".join(part for part in (
                             f"missing {_listed(missing)}" if missing else "",
                             f"unexpected {_listed(unexpected)}" if unexpected else "") if part))
    for name, param in params.items():
        file.check_weight(f"model.{name}", repr(name), param.shape)
    return [(f"model.{name}", param) for name, param in params.items()]


def _listed(names):
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


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


def _optimizer_state(file, optimizer, saved):
    """The optimizer's state dict from the checkpoint, every part checked; nothing is loaded yet."""
    path = file.path
    if not {"type", "num_params", "param_groups", "state"} <= set(saved):
        raise ValueError(f"{path}: the optimizer header lacks {sorted({'type', 'num_params', 'param_groups', 'state'} - set(saved))}")
    if saved["type"] != type(optimizer).__name__:
        raise ValueError(f"{path} holds {saved['type']} state, cannot load it into {type(optimizer).__name__}")
    params = optimizer.parameters()
    groups = saved["param_groups"]
    if (saved["num_params"] != len(params) or not isinstance(groups, list)
            or len(groups) != len(optimizer.param_groups)):
        raise ValueError(f"{path} holds optimizer state for {saved['num_params']} parameters in "
                         f"{len(groups) if isinstance(groups, list) else '?'} groups, the optimizer has "
                         f"{len(params)} in {len(optimizer.param_groups)}")
    for group, current in zip(groups, optimizer.param_groups):
        if not isinstance(group, dict) or set(group) != set(current) - {"params"}:
            raise ValueError(f"{path}: a saved optimizer param group has the settings "
                             f"{sorted(group) if isinstance(group, dict) else group!r}, "
                             f"the optimizer's are {sorted(set(current) - {'params'})}")
        for key, value in group.items():  # lr, betas, eps, weight_decay: finite numbers
            for number in value if isinstance(value, list) else [value]:
                if not isinstance(number, bool):
                    validation.number(f"{path}: optimizer {key}", number, minimum=0.0)
    if not isinstance(saved["state"], dict):
        raise ValueError(f"{path}: the optimizer state must be a JSON object")
    state = {}
    for index, scalars in saved["state"].items():
        if not (index.isdigit() and int(index) < len(params)) or not isinstance(scalars, dict):
            raise ValueError(f"{path}: optimizer state for parameter {index!r}, the optimizer has {len(params)}")
        for key, value in scalars.items():  # step counts
            validation.integer(f"{path}: optimizer {key} of parameter {index}", value, minimum=0)
        state[int(index)] = dict(scalars)
    arrays = []
    for name in file.names():
        if name.startswith("optimizer."):
            parts = name.split(".", 2)
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) not in state:
                raise ValueError(f"{path}: unexpected optimizer tensor {name!r}")
            index, key = int(parts[1]), parts[2]
            file.check_weight(name, f"optimizer {key} of parameter {index}", params[index].shape)
            arrays.append((name, index, key))
    for name, index, key in arrays:  # checked: now copied out of the file into the optimizer's own arrays
        state[index][key] = np.array(file.array(name, params[index].dtype))
    groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group for group in groups]
    return {"state": state, "param_groups": groups}


# ---- writing ------------------------------------------------------------------------------


def _to_json(value, what):
    try:
        return json.dumps(value)
    except TypeError as error:
        raise TypeError(f"checkpoint {what} must be JSON-serialisable: {error}") from None


def atomic_write(path, write):
    """Call write(temporary path) beside `path`, fsync, then rename over `path`.

    Readers see the old file or the new one, never half of one, even after SIGKILL. The
    temporary file's name holds the writer's process id: one left by a writer that no
    longer runs (killed mid-save) is deleted on the next save to the same path, so a kill
    never leaves a full-size hidden file forever. A write that fails (a full disk, a
    read-only folder) raises SaveError naming `path`, and removes its temporary file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise SaveError(f"cannot write {path}: cannot create its folder ({error.strerror or error})") from None
    _remove_stale_temporaries(folder, name)
    # The pid and a random part: two processes saving at once never write into each other's file.
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(error, Exception) and _is_write_failure(error):
            raise SaveError(f"cannot write {path}: {_reason(error)}; the previous file, if any, is unchanged") from None
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_stale_temporaries(folder, name):
    pattern = re.compile(re.escape(f".{name}.") + r"(\d+)-[0-9a-f]{12}\.tmp")
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match and not _process_alive(int(match[1])):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass  # another save removed it first, or the folder is read-only: the write will say so


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_write_failure(error):
    # safetensors reports I/O failures as its own SafetensorError, with the OS error in the text.
    return isinstance(error, OSError) or type(error).__name__ == "SafetensorError"


def _reason(error):
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
