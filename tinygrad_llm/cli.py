"""The `tinygrad-llm` command line (also `python -m tinygrad_llm`): pretrain, generate, import-gpt2, info.

Each subcommand is a pair of functions: `add_<name>(subparsers)` declares its options and
`run_<name>(args)` does the work through the Python API (train, generate, checkpoint), so
the command line adds no behaviour of its own and a new subcommand is one more pair.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np

from . import backend
from .checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from .datasets import DownloadError
from .generate import generate_stream, text_to_token_ids
from .model import GPT2_PRESETS, GPT2_SIZES, GPTModel, gpt2_config, parameter_counts
from .optim import AdamW
from .train import TrainingDivergedError, perplexity, plot_losses, train_model_simple
from .weights import load_gpt2

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

# pretrain's settings and their defaults (the book's chapter 5 run, on the tiny model).
PRETRAIN_DEFAULTS = {
    "data": "the-verdict", "config": "tiny", "epochs": 10, "batch_size": 2, "context_length": None,
    "lr": 4e-4, "weight_decay": 0.1, "warmup": 0, "cosine": False, "min_lr": 0.0, "grad_clip": None,
    "train_ratio": 0.9, "eval_freq": 5, "eval_iter": 5, "seed": 123,
}
CHECKPOINT_NAME = "checkpoint.safetensors"
PLOT_NAME = "loss.png"
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
    from . import datasets

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
    from .tokenizers import get_gpt2_tokenizer

    return get_gpt2_tokenizer()


# ---- pretrain -----------------------------------------------------------------------------


def add_pretrain(subparsers):
    p = subparsers.add_parser(
        "pretrain", help="train a GPT from scratch on a text (the book's chapter 5)",
        description="Train a GPT on a text with AdamW, printing train/val loss and perplexity every "
                    "--eval-freq steps and a sample after each epoch. The checkpoint (weights, optimizer, "
                    "random state, data position) is written to OUT/checkpoint.safetensors after every "
                    "epoch and on Ctrl-C; --resume continues it bit for bit.")
    d = PRETRAIN_DEFAULTS
    # Defaults are applied later, so --resume can tell a flag given on the command line from a default.
    p.add_argument("--data", help=f"a registered data set or a text file (default {d['data']})")
    p.add_argument("--config", help="tiny, gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, 124M, ... or FILE.json "
                                    f"(default {d['config']})")
    p.add_argument("--epochs", type=int, help=f"default {d['epochs']}")
    p.add_argument("--batch-size", type=int, help=f"default {d['batch_size']}")
    p.add_argument("--context-length", type=int,
                   help="tokens per training window (the loader's max_length = stride) and the model's context "
                        "(default: the config's)")
    p.add_argument("--lr", type=float, help=f"AdamW's (peak) learning rate (default {d['lr']})")
    p.add_argument("--weight-decay", type=float, help=f"default {d['weight_decay']}")
    p.add_argument("--warmup", type=int, help="linear learning-rate warmup steps (default 0)")
    p.add_argument("--cosine", action="store_const", const=True, help="cosine decay of the learning rate to --min-lr")
    p.add_argument("--min-lr", type=float, help="the learning rate at the end of the cosine decay (default 0)")
    p.add_argument("--grad-clip", type=float, help="clip the gradients' global L2 norm to this (default off)")
    p.add_argument("--train-ratio", type=float, help=f"share of the text used for training (default {d['train_ratio']})")
    p.add_argument("--eval-freq", type=int, help=f"evaluate every this many steps (default {d['eval_freq']})")
    p.add_argument("--eval-iter", type=int, help=f"batches per evaluation (default {d['eval_iter']})")
    p.add_argument("--seed", type=int, help=f"seeds initialisation, shuffling and dropout (default {d['seed']})")
    p.add_argument("--out", required=True, help="folder for the checkpoint and the plot")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT with its saved settings")
    p.add_argument("--plot", action="store_true", help=f"write the loss plot to OUT/{PLOT_NAME}")
    p.add_argument("--device", choices=backend.DEVICES, default=backend.default_device())
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_pretrain)


def pretrain_settings(args, checkpoint):
    """The run's settings: the defaults overridden by the flags given, or with --resume the saved ones."""
    given = {key: getattr(args, key) for key in PRETRAIN_DEFAULTS if getattr(args, key) is not None}
    if not args.resume:
        settings = {**PRETRAIN_DEFAULTS, **given}
        settings["config"] = model_config(settings["config"])
        if settings["context_length"] is not None:
            settings["config"]["context_length"] = settings["context_length"]
        settings["context_length"] = settings["config"]["context_length"]
        return settings
    if not os.path.isfile(checkpoint):
        raise SystemExit(f"--resume: there is no checkpoint {checkpoint} to continue")
    settings = read_checkpoint(checkpoint)["metadata"].get("run")
    if settings is None:
        raise SystemExit(f"--resume: {checkpoint} was not written by pretrain, so there is no run to continue")
    if "config" in given:
        given["config"] = {**model_config(given["config"]), "context_length": settings["context_length"]}
    conflicts = [f"--{key.replace('_', '-')} ({value!r}, saved {settings[key]!r})"
                 for key, value in given.items() if settings[key] != value]
    if conflicts:
        raise SystemExit(f"--resume continues the saved run unchanged, but these flags differ from it: "
                         f"{', '.join(conflicts)}")
    return settings


def run_pretrain(args):
    from .data import create_dataloader_v1

    checkpoint = os.path.join(args.out, CHECKPOINT_NAME)
    s = pretrain_settings(args, checkpoint)
    text = read_text(s["data"])
    split = int(s["train_ratio"] * len(text))
    backend.manual_seed(s["seed"])
    model = GPTModel(s["config"]).to(device=args.device)
    tokenizer = get_tokenizer()
    loader = dict(batch_size=s["batch_size"], max_length=s["context_length"], stride=s["context_length"])
    train_loader = create_dataloader_v1(text[:split], shuffle=True, drop_last=True, **loader)
    val_loader = create_dataloader_v1(text[split:], shuffle=False, drop_last=False, **loader)
    optimizer = AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    counts = parameter_counts(s["config"])
    print(f"{'Resuming' if args.resume else 'Training'} a {counts['total']:,}-parameter GPT on {s['data']} "
          f"({len(train_loader)} batches of {s['batch_size']}x{s['context_length']} tokens per epoch, "
          f"{s['epochs']} epochs) -> {checkpoint}")

    started = time.perf_counter()
    try:
        train_losses, val_losses, tokens_seen = train_model_simple(
            model, train_loader, val_loader, optimizer, args.device, s["epochs"], s["eval_freq"], s["eval_iter"],
            START_CONTEXT, tokenizer, warmup_steps=s["warmup"], cosine_decay=s["cosine"], min_lr=s["min_lr"],
            grad_clip=s["grad_clip"], checkpoint_path=checkpoint, resume=args.resume,
            checkpoint_metadata={"run": s, "tokenizer": "gpt2"}, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nInterrupted: the checkpoint {checkpoint} holds the last finished step; continue with\n"
              f"  tinygrad-llm pretrain --out {args.out} --resume", file=sys.stderr)
        return 130
    except TrainingDivergedError as error:
        print(error, file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started

    if train_losses:
        print(f"Final: train loss {train_losses[-1]:.3f} (ppl {perplexity(train_losses[-1]):.1f}), "
              f"val loss {val_losses[-1]:.3f} (ppl {perplexity(val_losses[-1]):.1f}); "
              f"{tokens_seen[-1]:,} tokens seen; this session {seconds:.1f} s")
    print(f"Checkpoint: {checkpoint}")
    if args.plot and train_losses:
        tokens_per_epoch = len(train_loader) * s["batch_size"] * s["context_length"]
        epochs_seen = [tokens / tokens_per_epoch for tokens in tokens_seen]
        print(f"Loss plot: {plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, os.path.join(args.out, PLOT_NAME))}")
    return 0


# ---- generate -----------------------------------------------------------------------------


def add_generate(subparsers):
    p = subparsers.add_parser("generate", help="continue a prompt with a trained model (streams the text)",
                              description="Continue --prompt with the model in --checkpoint or OpenAI's GPT-2 "
                                          "(--model), printing the text as it is generated. Temperature 0 is "
                                          "greedy; otherwise top-k, then top-p, then temperature shape the "
                                          "distribution sampled from.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint written by pretrain or import-gpt2")
    which.add_argument("--model", metavar="SIZE|DIR",
                       help="OpenAI's GPT-2: gpt2-small ... gpt2-xl or 124M ... 1558M (downloaded on first use, "
                            "which needs a network) or a Hugging Face folder")
    p.add_argument("--prompt", default=START_CONTEXT, help=f"the text to continue (default {START_CONTEXT!r})")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability")
    p.add_argument("--seed", type=int, help="seed of the sampling (default: a fresh random one)")
    p.add_argument("--device", choices=backend.DEVICES, default=backend.default_device())
    p.set_defaults(run=run_generate)


def load_generation_model(args):
    """(model, tokenizer) for the generate subcommand."""
    if args.model is not None:
        model = load_openai_gpt2(args.model)
    else:
        model, _ = model_from_checkpoint(args.checkpoint)
    return model.to(device=args.device), get_tokenizer()


def run_generate(args):
    model, tokenizer = load_generation_model(args)
    prompt = text_to_token_ids(args.prompt, tokenizer)
    # Loading the checkpoint restored the training run's generator: without --seed, sample afresh.
    seed = np.random.SeedSequence().entropy if args.seed is None else args.seed
    print(args.prompt, end="", flush=True)
    generated, shown = [], ""
    for token in generate_stream(model, prompt, args.max_new_tokens, model.cfg["context_length"],
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=seed):
        generated.append(int(token[0]))
        text = tokenizer.decode(generated)
        # A multi-byte character can span tokens: wait until it is complete before printing.
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(tokenizer.decode(generated)[len(shown):])
    return 0


# ---- import-gpt2 --------------------------------------------------------------------------


def add_import_gpt2(subparsers):
    p = subparsers.add_parser("import-gpt2", help="save OpenAI's GPT-2 weights as a checkpoint (the book's section 5.5)",
                              description="Read GPT-2 from a Hugging Face folder (config.json with model.safetensors "
                                          "or pytorch_model.bin) or by size, downloaded once into the cache (which "
                                          "needs a network), and save it as a checkpoint for generate, info and "
                                          "fine-tuning.")
    p.add_argument("--from", dest="source", required=True, metavar="DIR|SIZE",
                   help="a Hugging Face folder, or gpt2-small ... gpt2-xl, 124M ... 1558M")
    p.add_argument("--out", required=True, metavar="CHECKPOINT", help="the checkpoint file to write")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.set_defaults(run=run_import_gpt2)


def load_openai_gpt2(source, dtype="float32"):
    """GPT-2 for --from / --model; a failed download ends the command with its reason, not a traceback."""
    try:
        return load_gpt2(source, dtype)
    except DownloadError as error:
        raise SystemExit(f"{error}\nGPT-2's weights come from the Hugging Face hub on first use, which needs a "
                         "network; a folder holding config.json and model.safetensors works offline") from None


def run_import_gpt2(args):
    model = load_openai_gpt2(args.source, args.dtype)
    save_checkpoint(args.out, model, source=args.source, tokenizer="gpt2")
    print(f"GPT-2 from {args.source}: {model.num_parameters():,} parameters "
          f"({model.cfg['n_layers']} layers, emb_dim {model.cfg['emb_dim']}) -> {args.out}")
    return 0


# ---- info ---------------------------------------------------------------------------------


def add_info(subparsers):
    p = subparsers.add_parser("info", help="describe a checkpoint: config, parameters, memory, training state",
                              description="Print a checkpoint's model config, parameter counts, memory and "
                                          "training progress without loading the weights.")
    p.add_argument("--checkpoint", required=True)
    p.set_defaults(run=run_info)


def run_info(args):
    info = read_checkpoint(args.checkpoint)
    cfg, tensors = info["config"], info["tensors"]
    counts = parameter_counts(cfg)
    model_bytes = sum(_nbytes(shape, dtype) for name, (shape, dtype) in tensors.items() if name.startswith("model."))
    optimizer_bytes = sum(_nbytes(shape, dtype) for name, (shape, dtype) in tensors.items() if name.startswith("optimizer."))
    print(f"checkpoint  {args.checkpoint} ({info['file_bytes'] / 2**20:.1f} MiB)")
    print("config      " + json.dumps(cfg))
    print(f"parameters  {counts['total']:,} ({counts['tied']:,} without the output head, as GPT-2 ties it)")
    print(f"memory      weights {model_bytes / 2**20:.1f} MiB, optimizer state {optimizer_bytes / 2**20:.1f} MiB"
          + (f" ({info['optimizer']['type']})" if info["optimizer"] else ""))
    state = info["metadata"].get("train_state")
    if state:
        history = state["history"]
        last = (f"; last train loss {history['train_losses'][-1]:.3f}, val loss {history['val_losses'][-1]:.3f}"
                if history["train_losses"] else "")
        print(f"training    step {state['step']}, epoch {state['epoch']} + {state['batch']} batches, "
              f"{state['tokens_seen']:,} tokens seen{last}")
    return 0


def _nbytes(shape, dtype):
    return math.prod(shape) * np.dtype(dtype).itemsize


# ---- entry point --------------------------------------------------------------------------

SUBCOMMANDS = (add_pretrain, add_generate, add_import_gpt2, add_info)


def build_parser():
    parser = argparse.ArgumentParser(prog="tinygrad-llm", description="Train and run a GPT built from scratch on NumPy.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        # Errors at the boundary (a bad checkpoint, token id or option) already name the problem.
        print(f"tinygrad-llm {args.command}: {error}", file=sys.stderr)
        return 2
    except DownloadError as error:
        print(f"tinygrad-llm {args.command}: {error}\n(data sets download on first use, which needs a network; "
              "offline, point TINYGRAD_LLM_DATA at a folder holding the files)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
