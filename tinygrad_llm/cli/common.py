"""What several subcommands share: option types that check their values, the tiny config, model
configs by name, texts, the tokenizer, GPT-2.

Every option that takes a number, a path or a device declares one of the types below, so a
bad value ends the command at once with argparse's one-line usage error naming the option
("argument --lr: value must be > 0.0, got -1.0", exit code 2), before anything is loaded,
trained or written. The numbers are checked by tinygrad_llm.validation, the same rules the
Python API applies to the arguments the options become.
"""
import argparse
import hashlib
import json
import os

from .. import backend, validation
from ..datasets import DownloadError
from ..model import GPT2_PRESETS, GPT2_SIZES, check_config, check_fits_in_memory, gpt2_config
from ..weights import load_gpt2


# ---- option types -------------------------------------------------------------------------------

def _option_type(parse, check, expected):
    def convert(text):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = expected  # argparse shows a type's name in some messages
    return convert


def integer(minimum=None, maximum=None):
    """An option type: an integer in [minimum, maximum]."""
    return _option_type(int, lambda value: validation.integer("value", value, minimum, maximum), "an integer")


def number(minimum=None, maximum=None, above=False, below=False):
    """An option type: a finite number >= minimum (> with above) and <= maximum (< with below)."""
    return _option_type(float, lambda value: validation.number("value", value, minimum, maximum, above, below),
                        "a number")


def existing_file(text):
    """An option type: a file that exists and can be read."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text} is not readable")
    return text


def existing_file_or_folder(text):
    """An option type: a file or a folder that exists."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    if not os.path.isfile(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is neither a file nor a folder")
    return text


def _nearest_folder(path):
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def output_folder(text):
    """An option type: a folder to write into, existing or not (then it is created), but never a file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    parent = _nearest_folder(text)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {text}: {parent} is not a writable folder")
    return text


def output_file(text):
    """An option type: a file to write (replaced if it exists), in a folder that is writable."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    parent = _nearest_folder(os.path.dirname(os.path.abspath(text)))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} is not a writable folder")
    return text


def device(text):
    """An option type: "cpu", "cuda" or "cuda:0", and for CUDA a CuPy that imports."""
    try:
        name = backend.check_device(text)
        backend.module_for(name)
    except (ValueError, RuntimeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def add_device_option(parser):
    """--device, defaulting to $TINYGRAD_LLM_DEVICE (checked like a value given on the command line)."""
    parser.add_argument("--device", type=device, default=os.environ.get("TINYGRAD_LLM_DEVICE", "cpu"),
                        help="cpu, or cuda (cuda:0) with CuPy installed (default $TINYGRAD_LLM_DEVICE, else cpu)")


def add_sampling_options(parser):
    """--temperature, --top-k, --top-p, --seed and --device: how `generate` and `chat` sample."""
    parser.add_argument("--temperature", type=number(minimum=0.0), default=0.0, help="0 (default) is greedy decoding")
    parser.add_argument("--top-k", type=integer(minimum=1), help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=number(minimum=0.0, maximum=1.0, above=True),
                        help="sample among the most likely tokens holding this probability")
    parser.add_argument("--seed", type=integer(minimum=0), help="seed of the sampling (default: a fresh random one)")
    add_device_option(parser)


# A GPT small enough to train on The Verdict in a few minutes on two CPU cores. The GPT-2
# vocabulary stays, so its text goes through the real tokenizer; most parameters are the
# token embedding and the output head (2 x 50257 x 128).
TINY_CONFIG = {
    "vocab_size": 50257,
    "context_length": 128,
    "emb_dim": 128,
    "n_heads": 4,
    "n_layers": 4,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

CHECKPOINT_NAME = "checkpoint.safetensors"
PLOT_NAME = "loss.png"
METRICS_NAME = "metrics.jsonl"
START_CONTEXT = "Every effort moves you"


def model_config(name):
    """A config dict from "tiny", a GPT-2 size ("gpt2-small" ... or "124M" ...) or a JSON file, checked."""
    if name == "tiny":
        return dict(TINY_CONFIG)
    if name in GPT2_PRESETS or name in GPT2_SIZES:
        return gpt2_config(name, qkv_bias=False)
    if name.endswith(".json"):
        try:
            with open(name, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SystemExit(f"cannot read config file {name}: {error}") from None
        check_fits_in_memory(check_config(config, source=name), "float32", source=name)
        return config
    raise SystemExit(f"unknown config {name!r}: expected tiny, one of {sorted(GPT2_PRESETS)}, "
                     f"{sorted(GPT2_SIZES)} or a FILE.json")


def data_path(data):
    """The file of --data: a path as given, or a registered data set (tl.datasets) downloaded on first use."""
    from .. import datasets

    if os.path.isfile(data):
        return data
    try:
        return str(datasets.path(data))
    except ValueError as error:
        raise SystemExit(f"--data {data!r} is not a file, and {error}") from None


def read_text(data):
    """The text of a registered data set or of a file path; a file that is not UTF-8 text is refused."""
    path = data_path(data)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as error:
        raise SystemExit(f"--data {path} is not UTF-8 text ({error.reason} at byte {error.start}): "
                         "the model trains on text files") from None


def text_sha256(text):
    """The sha256 of a text's UTF-8 bytes: a run records it to notice changed data on --resume."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def get_tokenizer():
    from ..tokenizers import get_gpt2_tokenizer

    return get_gpt2_tokenizer()


def load_openai_gpt2(source, dtype="float32"):
    """GPT-2 for --from / --model; a failed download ends the command with its reason, not a traceback."""
    try:
        return load_gpt2(source, dtype)
    except DownloadError as error:
        raise SystemExit(f"{error}\nGPT-2's weights come from the Hugging Face hub on first use, which needs a "
                         "network; a folder holding config.json and model.safetensors works offline") from None
