"""OpenAI's GPT-2 weights: Hugging Face files in and out, the book's state dicts, downloads.

Hugging Face stores GPT-2 the way OpenAI's TensorFlow code laid it out, and the book's
section 5.5 reads the same layout:

- its `Conv1D` layers keep weights as (in, out), the transpose of `Linear`'s (out, in);
- one `c_attn` projection packs Q, K and V side by side: (emb_dim, 3 * emb_dim);
- the output head is tied to the token embedding (`lm_head.weight` is `wte.weight`);
- files written by older transformers (OpenAI's on the hub among them) carry each layer's
  causal mask as a tensor (`attn.bias`, `attn.masked_bias`).

`_book_names` alone relates a Hugging Face tensor to the book's parameter names; import,
export and the book's nested `params` all go through it.
"""
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from . import backend, datasets, validation
from .checkpoint import atomic_write
from .tensor_files import SafetensorsFile
from .model import GPT2_SIZES, GPTModel, check_fits_in_memory, layer_norm_eps

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
ENDOFTEXT_ID = 50256

# OpenAI's four GPT-2 sizes on the Hugging Face hub, as "124M" ... and as "gpt2-small" ...
GPT2_REPOS = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
_SIZE_OF_NAME = {name: size for size, name in GPT2_SIZES.items()}
# The hub, or a mirror of it: the variable huggingface_hub reads, so one setting serves both.
ENDPOINT_VARIABLE = "HF_ENDPOINT"
DEFAULT_ENDPOINT = "https://huggingface.co"

# Hugging Face module (inside block h.{i}) -> the book's module (inside trf_blocks.{i}).
_BLOCK_MODULES = {
    "ln_1": "norm1",
    "attn.c_attn": "att",  # split into att.W_query, att.W_key, att.W_value
    "attn.c_proj": "att.out_proj",
    "ln_2": "norm2",
    "mlp.c_fc": "ff.layers.0",
    "mlp.c_proj": "ff.layers.2",
}
_TOP_MODULES = {"wte": "tok_emb", "wpe": "pos_emb", "ln_f": "final_norm"}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
_QKV = ("W_query", "W_key", "W_value")
_LAYER_NORM_NAMES = {"weight": "scale", "bias": "shift"}
_BLOCK_TENSOR = re.compile(r"h\.(\d+)\.(.+)\.(weight|bias)")
# Causal masks that older transformers saved with the weights; the model builds its own.
_MASK_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


def _book_names(hf_name):
    """The book's parameters that Hugging Face's tensor `hf_name` holds, and how.

    Returns (book names, transposed, packed), or None for a name GPT-2 does not have:
    `transposed` for Conv1D weights, `packed` when the tensor is Q, K and V side by side
    (split along its last axis). `hf_name` has no "transformer." prefix.
    """
    if hf_name == "lm_head.weight":
        return ["out_head.weight"], False, False
    module, _, kind = hf_name.rpartition(".")
    if module in _TOP_MODULES and kind in ("weight", "bias"):
        if module == "ln_f":
            kind = _LAYER_NORM_NAMES[kind]
        elif kind == "bias":
            return None
        return [f"{_TOP_MODULES[module]}.{kind}"], False, False
    match = _BLOCK_TENSOR.fullmatch(hf_name)
    if match is None or match[2] not in _BLOCK_MODULES:
        return None
    layer, module, kind = match.groups()
    prefix = f"trf_blocks.{layer}.{_BLOCK_MODULES[module]}"
    if module.startswith("ln_"):
        return [f"{prefix}.{_LAYER_NORM_NAMES[kind]}"], False, False
    transposed = kind == "weight" and module in _CONV1D
    if module == "attn.c_attn":
        return [f"{prefix}.{name}.{kind}" for name in _QKV], transposed, True
    return [f"{prefix}.{kind}"], transposed, False


def _hf_names(n_layers, tied=True):
    """Every tensor name of a GPT-2 with `n_layers` blocks, without the "transformer." prefix."""
    names = ["wte.weight", "wpe.weight"]
    for layer in range(n_layers):
        names += [f"h.{layer}.{module}.{kind}" for module in _BLOCK_MODULES for kind in ("weight", "bias")]
    names += ["ln_f.weight", "ln_f.bias"]
    return names if tied else names + ["lm_head.weight"]


def _hf_shape(book_shape, transposed, packed):
    shape = tuple(reversed(book_shape)) if transposed else tuple(book_shape)
    return shape[:-1] + (3 * shape[-1],) if packed else shape


def _to_book(array, transposed, packed):
    parts = np.split(array, 3, axis=-1) if packed else [array]
    return [part.T if transposed else part for part in parts]


def _to_hf(arrays, transposed, packed):
    parts = [array.T if transposed else array for array in arrays]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1) if packed else parts[0])


def _load_tensors(model, names, tensors, source):
    """Copy Hugging Face-named tensors into `model`, checking every name, shape, dtype and value first.

    `tensors` is a `_FileTensors` or an `_ArrayTensors`: `check(name, shape)` refuses a bad
    tensor, `read(name, dtype)` gives it as an array. Nothing is written until every
    tensor passed, so a bad file leaves `model` as it was; then the tensors are copied one
    at a time (from a memory map, for safetensors), so memory stays close to the model's
    own. Without an `lm_head.weight`, an untied output head gets the token embedding (GPT-2 ties them).
    """
    params = dict(model.named_parameters())  # a tied out_head is listed once, as tok_emb
    copies, assigned = [], set()
    for name in names:
        hf_name = name.removeprefix("transformer.")
        if _MASK_BUFFERS.fullmatch(hf_name):
            continue
        mapping = _book_names(hf_name)
        if mapping is None:
            raise ValueError(f"{source}: unexpected tensor {name!r}, which GPT-2 does not have")
        book_names, transposed, packed = mapping
        if book_names == ["out_head.weight"] and "out_head.weight" not in params:
            continue  # the model ties its head, so the embedding already fills it
        targets = [params[book_name] for book_name in book_names if book_name in params]
        if len(targets) != len(book_names):
            raise ValueError(f"{source}: tensor {name!r} has no place in this model, which has no "
                             f"parameter {book_names[-1]!r} ({model.cfg['n_layers']} layers, "
                             f"qkv_bias={model.cfg.get('qkv_bias', False)})")
        expected = _hf_shape(targets[0].shape, transposed, packed)
        tensors.check(name, expected)
        copies.append((name, targets, transposed, packed))
        assigned.update(book_names)
    tie_head = "out_head.weight" in params and "out_head.weight" not in assigned and "tok_emb.weight" in assigned
    missing = [name for name in params if name not in assigned and not (tie_head and name == "out_head.weight")]
    if missing:
        raise ValueError(f"{source}: no tensor for parameter(s) {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for name, targets, transposed, packed in copies:
        for target, part in zip(targets, _to_book(tensors.read(name, model.dtype), transposed, packed)):
            _copy(part, target)
    if tie_head:
        params["out_head.weight"].data[...] = params["tok_emb.weight"].data
    return model


def _copy(array, param):
    if param.device == "cpu":
        np.copyto(param.data, array, casting="same_kind")  # straight from the file's memory map
    else:
        param.data[...] = backend.to_device(np.ascontiguousarray(array, dtype=param.dtype), param.device)


class _FileTensors:
    """The tensors of a safetensors file, memory-mapped (float16/bfloat16 converted on reading)."""

    def __init__(self, path):
        self.file = SafetensorsFile(path, "weights file")

    def names(self):
        return self.file.names()

    def check(self, name, shape):
        self.file.check_weight(name, repr(name), shape)

    def read(self, name, dtype):
        return self.file.array(name, dtype)


class _ArrayTensors:
    """Tensors already in memory (a torch file's state dict, the book's params), as NumPy arrays."""

    def __init__(self, arrays, source):
        self.arrays, self.source = arrays, source

    def names(self):
        return list(self.arrays)

    def check(self, name, shape):
        _check_weight_array(self.arrays[name], repr(name), self.source, shape)

    def read(self, name, dtype):
        return self.arrays[name]


def _check_weight_array(array, label, source, shape=None):
    """The in-memory twin of SafetensorsFile.check_weight: float, the expected shape, finite."""
    if array.dtype.kind != "f":
        raise ValueError(f"{source}: tensor {label} has dtype {array.dtype}; weights must be float")
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(f"{source}: tensor {label} has shape {array.shape}, expected {tuple(shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{source}: tensor {label} holds NaN or infinite values: a model with such weights "
                         "computes nothing meaningful, so it is refused")


# ---------------------------------------------------------------------------- Hugging Face files

def _read_config(path):
    """config.json as a dict; a missing file, or one that is not a JSON object, is named."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: a Hugging Face GPT-2 folder needs its {CONFIG_FILE}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a JSON config ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a GPT-2 config: it holds a JSON {type(config).__name__}, not an object")
    return config


def book_config(hf_config, source=CONFIG_FILE):
    """The book's config dict for a Hugging Face GPT-2 config (a dict as in config.json).

    Settings that change the arithmetic in a way GPTModel does not implement are refused
    rather than silently computed differently.
    """
    missing = [key for key in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer") if key not in hf_config]
    if missing:
        raise ValueError(f"{source} lacks {missing}: is it a GPT-2 config?")
    for key in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer"):
        validation.integer(f"{source}: {key}", hf_config[key], minimum=1)
    supported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both GPT-2's tanh approximation
        "n_inner": (None, 4 * hf_config["n_embd"]),  # the book's feed-forward width
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
    }
    for key, allowed in supported.items():
        if hf_config.get(key, allowed[0]) not in allowed:
            raise ValueError(f"{source}: {key}={hf_config[key]!r} is not supported; expected one of {allowed}")
    return {
        "vocab_size": hf_config["vocab_size"],
        "context_length": hf_config["n_positions"],
        "emb_dim": hf_config["n_embd"],
        "n_heads": hf_config["n_head"],
        "n_layers": hf_config["n_layer"],
        "drop_rate": hf_config.get("resid_pdrop", 0.1),
        "qkv_bias": True,
        "tie_weights": hf_config.get("tie_word_embeddings", True),
        "layer_norm_eps": hf_config.get("layer_norm_epsilon", 1e-5),
    }


def _weights_file(path):
    """(config.json, weights file) of a save_pretrained folder, or of a weights file given directly."""
    path = Path(path)
    if path.is_file():
        return path.parent / CONFIG_FILE, path
    for name in (SAFETENSORS_FILE, TORCH_FILE):
        if (path / name).is_file():
            return path / CONFIG_FILE, path / name
    raise FileNotFoundError(f"{path} holds neither {SAFETENSORS_FILE} nor {TORCH_FILE}")


def _import_torch(path):
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch (pip install torch); safetensors files do not") from None
    return torch


def _torch_load(path):
    """A torch file's contents through torch.load(weights_only=True), which refuses code: no pickle runs.

    Anything it refuses (a pickle of objects, a damaged or truncated file) is one ValueError naming the file.
    """
    torch = _import_torch(path)
    try:
        with warnings.catch_warnings():  # its notes on pickle protocols would only precede the refusal
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError ... for a bad file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a plain torch weights file, so it was not loaded "
                         f"(torch.load(weights_only=True) refused it: {reason})") from None


def _torch_arrays(state, path):
    """{name: np.ndarray} of a torch state dict; bfloat16 tensors become float32 (NumPy has no bfloat16)."""
    torch = _import_torch(path)
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a dict of tensor names to tensors)")
    return {name: (value.float() if value.dtype == torch.bfloat16 else value).numpy() for name, value in state.items()}


def load_hf_gpt2(path_or_dir, dtype="float32"):
    """A GPTModel (in eval mode, qkv_bias=True, its head tied as GPT-2's) from Hugging Face files.

    `path_or_dir` is a save_pretrained folder (config.json + model.safetensors, or
    pytorch_model.bin, which needs torch) or such a weights file beside its config.json.
    Safetensors are memory-mapped and read one tensor at a time, so memory stays close to
    the model's own. float16 and bfloat16 weights are converted to `dtype`; any other
    non-float tensor, and NaN or infinite values, are refused naming the tensor.
    """
    config_path, weights_path = _weights_file(path_or_dir)
    hf_config = _read_config(config_path)
    config = book_config(hf_config, config_path)
    check_fits_in_memory(config, dtype, source=config_path)
    model = GPTModel(config, dtype=dtype, init_weights=False)  # loaded next
    if weights_path.suffix == ".safetensors":
        tensors = _FileTensors(weights_path)
    else:
        tensors = _ArrayTensors(_torch_arrays(_torch_load(weights_path), weights_path), weights_path)
    _load_tensors(model, tensors.names(), tensors, weights_path)
    return model.eval()


def save_hf_gpt2(model, directory):
    """Write `model` as config.json + model.safetensors that GPT2LMHeadModel.from_pretrained loads.

    Without qkv_bias the Q, K, V biases are written as zeros (GPT-2 always has them). A head
    equal to the token embedding is saved tied; another head as its own `lm_head.weight`.
    Each file is written to a temporary name and renamed, so a crash leaves no half file.
    """
    from safetensors.numpy import save_file

    cfg, state = model.cfg, model.state_dict()
    tied = np.array_equal(state["out_head.weight"], state["tok_emb.weight"])
    tensors = {}
    for hf_name in _hf_names(cfg["n_layers"], tied):
        book_names, transposed, packed = _book_names(hf_name)
        # A model without qkv_bias has no Q, K, V biases: zeros compute the same.
        arrays = [state[name] if name in state else np.zeros(cfg["emb_dim"], model.dtype) for name in book_names]
        key = hf_name if hf_name == "lm_head.weight" else f"transformer.{hf_name}"
        tensors[key] = _to_hf(arrays, transposed, packed)
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg["vocab_size"],
        "n_positions": cfg["context_length"],
        "n_embd": cfg["emb_dim"],
        "n_head": cfg["n_heads"],
        "n_layer": cfg["n_layers"],
        "layer_norm_epsilon": layer_norm_eps(model.cfg),
        "activation_function": "gelu_new",
        "resid_pdrop": cfg["drop_rate"],
        "embd_pdrop": cfg["drop_rate"],
        "attn_pdrop": cfg["drop_rate"],
        "tie_word_embeddings": bool(tied),
        # GPT-2's <|endoftext|> begins and ends texts; a smaller vocabulary has no such token.
        "bos_token_id": ENDOFTEXT_ID if cfg["vocab_size"] > ENDOFTEXT_ID else None,
        "eos_token_id": ENDOFTEXT_ID if cfg["vocab_size"] > ENDOFTEXT_ID else None,
        "dtype": str(model.dtype),
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # transformers refuses a safetensors file whose metadata does not name its framework.
    atomic_write(directory / SAFETENSORS_FILE, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_FILE, lambda path: Path(path).write_text(json.dumps(hf_config, indent=2)))
    return directory


# ---------------------------------------------------------------------------- the book's formats

def load_book_state_dict(model_or_cfg, path, dtype="float32"):
    """Load a state dict saved by the book's PyTorch code (`torch.save(model.state_dict(), "model.pth")`).

    `model_or_cfg` is a GPTModel or the book's config dict to build one. The file is read with
    torch.load(weights_only=True); section 5.4's `{"model_state_dict": ..., "optimizer_state_dict": ...}`
    is accepted too (its optimizer state is ignored). Returns the model in eval mode, as the
    book puts it after loading.
    """
    state = _torch_load(path)
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    arrays = _torch_arrays(state, path)
    for name, array in arrays.items():
        if not name.endswith(".att.mask"):  # the book's causal-mask buffers, which the model skips
            _check_weight_array(array, repr(name), path)
    model = model_or_cfg if isinstance(model_or_cfg, GPTModel) else GPTModel(model_or_cfg, dtype=dtype, init_weights=False)
    return model.load_state_dict(arrays).eval()


# The book's nested `params` (section 5.5, read from OpenAI's TensorFlow checkpoint) name a
# tensor by its path: params["blocks"][3]["attn"]["c_attn"]["w"] is Hugging Face's
# h.3.attn.c_attn.weight, in the same (in, out) layout; LayerNorms name their scale "g".
_BOOK_LEAVES = {"w": "weight", "g": "weight", "b": "bias"}
_BOOK_TOP_LEVEL = {"wte": "wte.weight", "wpe": "wpe.weight", "g": "ln_f.weight", "b": "ln_f.bias"}


def _flatten_book_params(params):
    flat = {hf_name: params[key] for key, hf_name in _BOOK_TOP_LEVEL.items()}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{_BOOK_LEAVES.get(key, key)}"] = value

    for layer, block in enumerate(params["blocks"]):
        walk(block, f"h.{layer}.")
    return flat


def load_weights_into_gpt(gpt, params):
    """The book's section 5.5 loader: copy OpenAI's nested `params` into `gpt` (built with qkv_bias=True).

    `params` as `download_and_load_gpt2` returns it. An untied output head gets the token
    embedding, as in the book.
    """
    flat = {name: np.asarray(value) for name, value in _flatten_book_params(params).items()}
    return _load_tensors(gpt, list(flat), _ArrayTensors(flat, "params"), "params")


def download_and_load_gpt2(model_size, models_dir=None, base_url=None):
    """The book's section 5.5 entry point: (settings, params) for "124M", "355M", "774M" or "1558M".

    Downloads Hugging Face's copy of OpenAI's weights once (see `download_gpt2`) and returns
    them in the book's format: settings as OpenAI's hparams.json, params as nested dicts.
    Everything is in memory at once, as in the book; `load_hf_gpt2` reads one tensor at a time.
    """
    directory = download_gpt2(model_size, models_dir, base_url=base_url)
    hf_config = _read_config(directory / CONFIG_FILE)
    settings = {"n_vocab": hf_config["vocab_size"], "n_ctx": hf_config["n_positions"],
                "n_embd": hf_config["n_embd"], "n_head": hf_config["n_head"], "n_layer": hf_config["n_layer"]}
    params = {"blocks": [{} for _ in range(hf_config["n_layer"])]}
    top_level = {hf_name: key for key, hf_name in _BOOK_TOP_LEVEL.items()}
    weights = SafetensorsFile(directory / SAFETENSORS_FILE, "weights file")

    def read(name):  # a float array in memory, as the book's TensorFlow loader returns
        weights.check_weight(name)
        return np.array(weights.array(name, np.float64 if weights.dtype_name(name) == "float64" else np.float32))

    for name in weights.names():
        hf_name = name.removeprefix("transformer.")
        if hf_name in top_level:
            params[top_level[hf_name]] = read(name)
        elif _BLOCK_TENSOR.fullmatch(hf_name) and not _MASK_BUFFERS.fullmatch(hf_name):
            _, layer, *path, kind = hf_name.split(".")  # h.3.attn.c_attn.weight
            if int(layer) >= len(params["blocks"]):
                raise ValueError(f"{weights.path}: tensor {name!r} is in block {layer}, but {CONFIG_FILE} "
                                 f"says n_layer={len(params['blocks'])}")
            node = params["blocks"][int(layer)]
            for key in path:
                node = node.setdefault(key, {})
            leaf = "b" if kind == "bias" else "g" if path[0].startswith("ln_") else "w"
            node[leaf] = read(name)
    return settings, params


# ---------------------------------------------------------------------------- downloads

def gpt2_size(name):
    """"124M", "355M", "774M" or "1558M" for a size or a preset name ("gpt2-small" ...)."""
    size = _SIZE_OF_NAME.get(name, name)
    if size not in GPT2_REPOS:
        raise ValueError(f"unknown GPT-2 size {name!r}: expected one of {list(GPT2_REPOS) + list(_SIZE_OF_NAME)}")
    return size


def download_gpt2(size, models_dir=None, base_url=None, progress=True):
    """The folder holding GPT-2 `size`'s config.json and model.safetensors, downloaded on first use.

    `size` is "124M", "355M", "774M", "1558M" or "gpt2-small" ... "gpt2-xl". The folder is
    `models_dir/<size>` if given (the book's layout), else `gpt2/<size>` in the cache folder
    (tl.datasets). A copy in $TINYGRAD_LLM_DATA/gpt2/<size> is used as it is. Nothing is
    fetched when both files are present. Files come from `base_url` (default $HF_ENDPOINT,
    else https://huggingface.co) as `<base_url>/<repo>/resolve/main/<file>`, with a
    progress bar; a download cut off midway resumes where it stopped on the next call.

    Verified: the safetensors header is well formed and its tensors cover the file exactly
    (a truncated or padded file, or an HTML error page, is refused), and the token
    embedding's shape agrees with config.json. No sha256 is pinned (none could be looked
    up when this was written, offline), so the bytes inside the tensors go unchecked.
    """
    size = gpt2_size(size)
    if data_dir := os.environ.get("TINYGRAD_LLM_DATA"):
        shipped = Path(data_dir) / "gpt2" / size
        if all((shipped / name).is_file() for name in (CONFIG_FILE, SAFETENSORS_FILE)):
            _check_gpt2_config(shipped / CONFIG_FILE)  # the user's files: refused if wrong, never deleted
            _check_gpt2_weights(shipped / CONFIG_FILE, shipped / SAFETENSORS_FILE)
            return shipped
    folder = Path(models_dir) / size if models_dir is not None else datasets.cache_dir() / "gpt2" / size
    base_url = (base_url or os.environ.get(ENDPOINT_VARIABLE) or DEFAULT_ENDPOINT).rstrip("/")
    url = f"{base_url}/{GPT2_REPOS[size]}/resolve/main"
    # Each file is checked when downloaded and each time it is found in the cache: a damaged copy
    # (an HTML error page saved as config.json, a truncated safetensors file) is fetched again.
    config_path = datasets.download_file(f"{url}/{CONFIG_FILE}", folder / CONFIG_FILE, progress=progress,
                                         check=_check_gpt2_config)
    datasets.download_file(f"{url}/{SAFETENSORS_FILE}", folder / SAFETENSORS_FILE, progress=progress,
                           check=lambda path: _check_gpt2_weights(config_path, path))
    return folder


def _check_gpt2_config(path):
    book_config(_read_config(path), path)


def _check_gpt2_weights(config_path, weights_path):
    """The weights file is safetensors, and its token embedding has the shape config.json implies."""
    hf_config = _read_config(config_path)
    weights = SafetensorsFile(weights_path, "weights file")
    names = {name.removeprefix("transformer."): name for name in weights.names()}
    shape = weights.shape(names["wte.weight"]) if "wte.weight" in names else None
    expected = (hf_config["vocab_size"], hf_config["n_embd"])
    if shape != expected:
        raise ValueError(f"{weights_path}: the token embedding wte.weight has shape {shape}, "
                         f"{config_path} implies {expected}")


def load_gpt2(source, dtype="float32", progress=True):
    """GPT-2 from a Hugging Face folder or weights file, or by size ("124M", "gpt2-small", ...).

    A size is downloaded on first use (see `download_gpt2`), which needs a network.
    """
    if os.path.exists(source):
        return load_hf_gpt2(source, dtype)
    return load_hf_gpt2(download_gpt2(source, progress=progress), dtype)
