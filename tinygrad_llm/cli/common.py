"""What several subcommands share: the tiny config, model configs by name, texts, the tokenizer, GPT-2."""
import json
import os

from ..datasets import DownloadError
from ..model import GPT2_PRESETS, GPT2_SIZES, gpt2_config
from ..weights import load_gpt2

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
    """A config dict from "tiny", a GPT-2 size ("gpt2-small" ... or "124M" ...) or a JSON file."""
    if name == "tiny":
        return dict(TINY_CONFIG)
    if name in GPT2_PRESETS or name in GPT2_SIZES:
        return gpt2_config(name, qkv_bias=False)
    if name.endswith(".json"):
        try:
            with open(name) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"cannot read config file {name}: {error}") from None
    raise SystemExit(f"unknown config {name!r}: expected tiny, one of {sorted(GPT2_PRESETS)}, "
                     f"{sorted(GPT2_SIZES)} or a FILE.json")


def read_text(data):
    """The text of a registered data set (tl.datasets) or of a file path."""
    from .. import datasets

    if os.path.isfile(data):
        path = data
    else:
        try:
            path = datasets.path(data)
        except ValueError as error:
            raise SystemExit(f"--data {data!r} is not a file, and {error}") from None
    with open(path, encoding="utf-8") as f:
        return f.read()


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
