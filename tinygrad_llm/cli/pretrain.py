"""`tinygrad-llm pretrain`: the book's chapter 5 run from a terminal."""
import argparse
import hashlib
import json
import os
import shlex
import signal
import sys
import time

from .. import backend, distributed
from ..checkpoint import read_checkpoint
from ..model import GPTModel, check_config, parameter_counts
from ..optim import AdamW
from ..train import TrainingDivergedError, perplexity, plot_losses, train_model_simple
from .common import (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, START_CONTEXT, add_device_option, get_tokenizer,
                     integer, model_config, number, output_folder, read_text, text_sha256)

# pretrain's settings and their defaults (the book's chapter 5 run, on the tiny model).
PRETRAIN_DEFAULTS = {
    "data": "the-verdict", "config": "tiny", "epochs": 10, "batch_size": 2, "context_length": None,
    "lr": 4e-4, "weight_decay": 0.1, "warmup": 0, "cosine": False, "min_lr": 0.0, "grad_clip": None,
    "train_ratio": 0.9, "eval_freq": 5, "eval_iter": 5, "seed": 123,
}
# The numeric settings' option types: the command line's values and those a checkpoint saved obey them.
OPTION_TYPES = {
    "epochs": integer(minimum=1), "batch_size": integer(minimum=1), "context_length": integer(minimum=1),
    "lr": number(minimum=0.0, above=True), "weight_decay": number(minimum=0.0), "warmup": integer(minimum=0),
    "min_lr": number(minimum=0.0), "grad_clip": number(minimum=0.0, above=True),
    "train_ratio": number(minimum=0.0, maximum=1.0, above=True, below=True),
    "eval_freq": integer(minimum=1), "eval_iter": integer(minimum=1), "seed": integer(minimum=0),
}


def add_pretrain(subparsers):
    p = subparsers.add_parser(
        "pretrain", help="train a GPT from scratch on a text (the book's chapter 5)",
        description="Train a GPT on a text with AdamW, printing train/val loss and perplexity every "
                    "--eval-freq steps and a sample after each epoch. The checkpoint (weights, optimizer, "
                    "random state, data position) is written to OUT/checkpoint.safetensors after every "
                    "epoch, every --save-every steps and on Ctrl-C or SIGTERM; --resume continues it bit for bit.")
    d = PRETRAIN_DEFAULTS
    # Defaults are applied later, so --resume can tell a flag given on the command line from a default.
    p.add_argument("--data", help=f"a registered data set, a text file or a folder of token shards from "
                                  f"tinygrad-llm prepare (default {d['data']})")
    p.add_argument("--config", help="tiny, gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, 124M, ... or FILE.json "
                                    f"(default {d['config']})")
    p.add_argument("--epochs", type=OPTION_TYPES["epochs"], help=f"default {d['epochs']}")
    p.add_argument("--batch-size", type=OPTION_TYPES["batch_size"], help=f"default {d['batch_size']}")
    p.add_argument("--context-length", type=OPTION_TYPES["context_length"],
                   help="tokens per training window (the loader's max_length = stride) and the model's context "
                        "(default: the config's)")
    p.add_argument("--lr", type=OPTION_TYPES["lr"], help=f"AdamW's (peak) learning rate (default {d['lr']})")
    p.add_argument("--weight-decay", type=OPTION_TYPES["weight_decay"], help=f"default {d['weight_decay']}")
    p.add_argument("--warmup", type=OPTION_TYPES["warmup"], help="linear learning-rate warmup steps (default 0)")
    p.add_argument("--cosine", action="store_const", const=True, help="cosine decay of the learning rate to --min-lr")
    p.add_argument("--min-lr", type=OPTION_TYPES["min_lr"], help="the learning rate at the end of the cosine decay (default 0)")
    p.add_argument("--grad-clip", type=OPTION_TYPES["grad_clip"], help="clip the gradients' global L2 norm to this (default off)")
    p.add_argument("--train-ratio", type=OPTION_TYPES["train_ratio"], help=f"share of the text used for training (default {d['train_ratio']})")
    p.add_argument("--eval-freq", type=OPTION_TYPES["eval_freq"], help=f"evaluate every this many steps (default {d['eval_freq']})")
    p.add_argument("--eval-iter", type=OPTION_TYPES["eval_iter"], help=f"batches per evaluation (default {d['eval_iter']})")
    p.add_argument("--seed", type=OPTION_TYPES["seed"], help=f"seeds initialisation, shuffling and dropout (default {d['seed']})")
    p.add_argument("--save-every", type=integer(minimum=1), metavar="N",
                   help="also write the checkpoint every N steps, mid-epoch (default: after each epoch only)")
    p.add_argument("--out", required=True, type=output_folder, help=f"folder for the checkpoint, the metrics log ({METRICS_NAME}: "
                                                "one JSON line per evaluation) and the plot")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT with its saved settings")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an OUT that holds one, replacing its checkpoint (default: refuse)")
    p.add_argument("--data-changed", action="store_true",
                   help="with --resume, continue although the --data text differs from the one the run began on")
    p.add_argument("--plot", action="store_true", help=f"write the loss plot to OUT/{PLOT_NAME}")
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_pretrain)


def pretrain_settings(args, checkpoint, ranks=1):
    """The run's settings: the defaults overridden by the flags given, or with --resume the saved ones."""
    given = {key: getattr(args, key) for key in PRETRAIN_DEFAULTS if getattr(args, key) is not None}
    if not args.resume:
        if os.path.exists(checkpoint) and not args.overwrite:
            raise SystemExit(f"{checkpoint} holds a run already: continue it with --resume, or replace it "
                             "with --overwrite (or choose another --out)")
        settings = {**PRETRAIN_DEFAULTS, **given, "ranks": ranks}
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
    settings = _checked_saved_settings(settings, checkpoint)
    if "data" in given:  # the same text may have moved: its sha256 is compared in run_pretrain
        settings = {**settings, "data": given.pop("data")}
    elif _is_path(settings["data"]):
        raise SystemExit(f"--resume: the run trained on the file {settings['data']!r}; name it with --data to "
                         "continue (a checkpoint never makes pretrain open a file you did not name)")
    if "config" in given:
        given["config"] = {**model_config(given["config"]), "context_length": settings["context_length"]}
    conflicts = [f"--{key.replace('_', '-')} ({value!r}, saved {settings[key]!r})"
                 for key, value in given.items() if settings[key] != value]
    if conflicts:
        raise SystemExit(f"--resume continues the saved run unchanged, but these flags differ from it: "
                         f"{', '.join(conflicts)}")
    saved_ranks = settings.get("ranks", 1)
    if isinstance(saved_ranks, bool) or not isinstance(saved_ranks, int) or saved_ranks < 1:
        raise SystemExit(f"--resume: {checkpoint} holds the setting ranks = {saved_ranks!r}: expected a whole number >= 1")
    if saved_ranks != ranks:
        # Each rank's dropout generator is in the checkpoint, and the epoch's batches are split
        # N ways: another rank count would continue a different run.
        raise SystemExit(f"--resume: {checkpoint} was written by a run on {saved_ranks} rank(s) (global batch "
                         f"{saved_ranks * settings['batch_size']}); resume it with mpiexec -n {saved_ranks}, "
                         f"not {ranks}")
    return settings


def _is_path(data):
    from .. import datasets

    return data not in datasets.REGISTRY


def _data_fingerprint(data):
    """The sha256 of the text, or of a shard folder's list of shard sha256s (its index holds them)."""
    from ..shards import is_shard_folder, read_index

    if is_shard_folder(data):
        return hashlib.sha256(json.dumps([shard["sha256"] for shard in read_index(data)["shards"]]).encode()).hexdigest()
    return text_sha256(read_text(data))


def _checked_saved_settings(settings, checkpoint):
    """The run settings stored in a checkpoint, held to the same rules as the options they came from."""
    if not isinstance(settings, dict) or not set(PRETRAIN_DEFAULTS) <= set(settings):
        raise SystemExit(f"--resume: {checkpoint} holds damaged run settings")
    for key, option_type in OPTION_TYPES.items():
        value = settings[key]
        if value is None and PRETRAIN_DEFAULTS[key] is None:
            continue
        try:
            option_type(str(value))
        except argparse.ArgumentTypeError as error:
            raise SystemExit(f"--resume: {checkpoint} holds the setting {key} = {value!r}: {error}") from None
    if not isinstance(settings["data"], str) or not isinstance(settings["cosine"], bool):
        raise SystemExit(f"--resume: {checkpoint} holds damaged run settings (data, cosine)")
    check_config(settings["config"], source=f"{checkpoint}: run config")
    return settings


def pretrain_loaders(s, world):
    """(train, val) loaders. A shard folder (tinygrad-llm prepare) is split by tokens and read
    memory-mapped, its batches drawn from a generator seeded with --seed; a text is split by
    characters and tokenized, as the book does.

    On N ranks both draw global batches of N x --batch-size rows, from a generator seeded
    with --seed on every rank; each rank trains on its rows of each (distributed.RankBatches)
    and evaluates the validation batches whole.
    """
    from ..data import DataLoader, create_dataloader_v1
    from ..shards import ShardDataset, is_shard_folder, read_index

    batch_size = s["batch_size"] * world.size
    if is_shard_folder(s["data"]):
        # The shards' sha256s were checked by _data_fingerprint in run_pretrain.
        split = int(s["train_ratio"] * read_index(s["data"], verify=False)["tokens"])
        windows = dict(max_length=s["context_length"], stride=s["context_length"], verify=False)
        train_loader = DataLoader(ShardDataset(s["data"], stop=split, **windows), batch_size, shuffle=True,
                                  drop_last=True, seed=s["seed"])
        val_loader = DataLoader(ShardDataset(s["data"], start=split, **windows), batch_size, shuffle=False,
                                drop_last=False)
    else:
        text = read_text(s["data"])
        split = int(s["train_ratio"] * len(text))
        loader = dict(batch_size=batch_size, max_length=s["context_length"], stride=s["context_length"])
        train_loader = create_dataloader_v1(text[:split], shuffle=True, drop_last=True,
                                            seed=s["seed"] if world.size > 1 else None, **loader)
        val_loader = create_dataloader_v1(text[split:], shuffle=False, drop_last=False, **loader)
    return (train_loader if world.size == 1 else distributed.RankBatches(train_loader, world)), val_loader


def run_pretrain(args):
    checkpoint = os.path.join(args.out, CHECKPOINT_NAME)
    distributed.supervise_rank()
    world = distributed.current()
    if world.rank > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints (and writes the checkpoint and the log)
    s = pretrain_settings(args, checkpoint, world.size)
    data_sha256 = _data_fingerprint(s["data"])
    if args.resume and s.get("data_sha256", data_sha256) != data_sha256 and not args.data_changed:
        raise SystemExit(f"--resume: the data of --data {s['data']} differs from the data this run began on "
                         f"(sha256 {data_sha256[:12]}..., saved {s['data_sha256'][:12]}...); resuming on other "
                         "data continues from a batch position that no longer means anything. Continue anyway "
                         "with --data-changed")
    s["data_sha256"] = data_sha256
    train_loader, val_loader = pretrain_loaders(s, world)
    world.select_device(args.device)  # under mpiexec on "cuda": this rank's own GPU, before anything goes there
    backend.manual_seed(s["seed"])
    model = GPTModel(s["config"]).to(device=args.device)
    if world.size > 1:
        backend.manual_seed(distributed.rank_seed(s["seed"], world.rank))  # same weights, own dropout masks
    tokenizer = get_tokenizer()
    optimizer = AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    counts = parameter_counts(s["config"])
    print(f"{'Resuming' if args.resume else 'Training'} a {counts['total']:,}-parameter GPT on {s['data']} "
          f"({len(train_loader)} batches of {s['batch_size']}x{s['context_length']} tokens per epoch"
          f"{f' on each of {world.size} ranks' if world.size > 1 else ''}, {s['epochs']} epochs) -> {checkpoint}")
    if world.size > 1:  # mpiexec's own messages name processes by their ids
        print("Process ids by rank: " + ", ".join(f"{rank}: {pid}" for rank, pid in enumerate(world.gather(os.getpid()))))

    started = time.perf_counter()
    try:
        with world.ending_together():
            train_losses, val_losses, tokens_seen = train_model_simple(
                model, train_loader, val_loader, optimizer, args.device, s["epochs"], s["eval_freq"], s["eval_iter"],
                START_CONTEXT, tokenizer, warmup_steps=s["warmup"], cosine_decay=s["cosine"], min_lr=s["min_lr"],
                grad_clip=s["grad_clip"], clip_during_warmup=True, checkpoint_path=checkpoint, resume=args.resume,
                checkpoint_metadata={"run": s, "tokenizer": "gpt2"}, save_every=args.save_every,
                metrics_path=os.path.join(args.out, METRICS_NAME), progress=not args.no_progress and world.rank == 0)
    except KeyboardInterrupt as error:
        if world.rank == 0:
            print(f"\nInterrupted: the checkpoint {checkpoint} holds the last finished step; continue with\n"
                  f"  tinygrad-llm pretrain --out {shlex.quote(args.out)} --resume"
                  + (f" --data {shlex.quote(s['data'])}" if _is_path(s["data"]) else ""), file=sys.stderr)
        return 128 + getattr(error, "signum", signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM
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
