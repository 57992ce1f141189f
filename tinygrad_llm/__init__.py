"""tinygrad_llm: a GPT built from scratch on NumPy (CuPy on a GPU) with a hand-written autograd."""
from . import backend, datasets, functional, nn, optim
from .backend import get_rng_state, manual_seed, set_rng_state
from .gradcheck import gradcheck
from .model import GPT2_PRESETS, GPT_CONFIG_124M, GPTModel, gpt2_config, parameter_counts
from .tensor import Tensor, concatenate, no_grad, split, tensor, where
from .checkpoint import load_checkpoint, save_checkpoint
# The function tl.generate replaces the attribute naming its module (tinygrad_llm.generate stays importable).
from .generate import generate

__all__ = [
    "Tensor", "no_grad", "tensor", "concatenate", "split", "where", "manual_seed",
    "get_rng_state", "set_rng_state", "gradcheck", "backend", "functional", "nn", "optim",
    "GPTModel", "GPT_CONFIG_124M", "GPT2_PRESETS", "gpt2_config", "parameter_counts",
    "generate", "save_checkpoint", "load_checkpoint",
]
