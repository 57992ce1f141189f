"""`tinygrad-llm finetune dpo | reward | ppo`: chapter 8 from a terminal.

dpo and reward train on the book's preference data (or --data FILE) split as the book
splits it; ppo samples responses to the training split's prompts and scores them with a
reward model from `finetune reward` (--reward-model) or, as a toy task, by the share of
response tokens that are among the tokens of --reward-tokens. Each writes its checkpoint,
its metrics log and its plots to --out.
"""
import argparse
import json
import os
import signal
import sys
import time

import numpy as np

from .. import backend
from ..checkpoint import model_from_checkpoint
from ..finetune.preference import plot_panels
from ..model import MultiHeadAttention
from ..nn import Dropout
from ..optim import AdamW
from ..train import TrainingDivergedError
from .common import (CHECKPOINT_NAME, METRICS_NAME, add_device_option, existing_file, get_tokenizer, integer,
                     load_openai_gpt2, number, output_folder)

REWARD_MODEL_NAME = "reward_model.safetensors"


def _add_common(subparsers, name, help_text, run):
    p = subparsers.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--model", required=True, metavar="CHECKPOINT",
                   help="the model to start from: a checkpoint (e.g. OUT/model.safetensors of `finetune instruct`), "
                        "or OpenAI's GPT-2 by size (gpt2-medium, 355M, ...) or a Hugging Face folder")
    p.add_argument("--out", required=True, type=output_folder, help="folder for the checkpoint, metrics and plots")
    p.add_argument("--seed", type=integer(minimum=0), default=123,
                   help="seeds shuffling, initialisation and sampling (default 123)")
    p.add_argument("--max-steps", type=integer(minimum=1), help="stop after this many steps (default: the whole run)")
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def _add_preference_data(p, lr):
    p.add_argument("--data", type=existing_file,
                   help="a preference JSON file of {instruction, input, chosen, rejected} entries "
                        "(default: the book's instruction-data-with-preference)")
    p.add_argument("--allow-identical", action="store_true",
                   help="keep entries whose chosen and rejected answers are the same (the book's file has 6 "
                        "and is always read with this on)")
    p.add_argument("--epochs", type=integer(minimum=1), default=1)
    p.add_argument("--batch-size", type=integer(minimum=1), default=8)
    p.add_argument("--lr", type=number(minimum=0.0, above=True), default=lr, help=f"AdamW's learning rate (default {lr})")
    p.add_argument("--weight-decay", type=number(minimum=0.0), default=0.01)
    p.add_argument("--eval-freq", type=integer(minimum=1), default=5, help="evaluate every this many steps (default 5)")
    p.add_argument("--eval-iter", type=integer(minimum=1), default=5, help="batches per evaluation (default 5)")


def add_dpo(subparsers):
    p = _add_common(subparsers, "dpo", "DPO on preference pairs, the book's chapter 8 run: a frozen reference "
                                       "copy, AdamW lr 5e-6, 1 epoch; writes OUT/dpo.png (losses, reward margins)",
                    run_dpo)
    _add_preference_data(p, lr=5e-6)
    p.add_argument("--beta", type=number(minimum=0.0, above=True), default=0.1,
                   help="how far the policy may move from the reference (default 0.1, the book's)")
    p.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                   help="a response's log-probability: the book's mean over its tokens or the DPO paper's sum")


def add_reward(subparsers):
    p = _add_common(subparsers, "reward", "train a reward model on preference pairs (pairwise loss, accuracy on "
                                          "the val split); writes OUT/reward.png", run_reward)
    _add_preference_data(p, lr=1e-5)


def add_ppo(subparsers):
    p = _add_common(subparsers, "ppo", "RLHF with PPO against a reward model or a toy token reward; writes "
                                       "OUT/ppo.png (reward, KL)", run_ppo)
    reward = p.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward-model", type=existing_file,
                        help=f"a reward model from `finetune reward` (OUT/{REWARD_MODEL_NAME})")
    reward.add_argument("--reward-tokens", type=reward_text, metavar="TEXT",
                        help="toy reward: the share of response tokens that are tokens of TEXT")
    p.add_argument("--steps", type=integer(minimum=1), default=100,
                   help="PPO steps, each rollouts then updates (default 100)")
    p.add_argument("--batch-size", type=integer(minimum=1), default=8, help="prompts per PPO step (default 8)")
    p.add_argument("--response-length", type=integer(minimum=1), default=32,
                   help="tokens sampled per response (default 32)")
    p.add_argument("--lr", type=number(minimum=0.0, above=True), default=1e-5)
    p.add_argument("--kl-coef", type=number(minimum=0.0), default=0.2, help="the initial KL coefficient (default 0.2)")
    p.add_argument("--target-kl", type=number(minimum=0.0, above=True), default=6.0,
                   help="the adaptive coefficient's target KL (default 6)")
    p.add_argument("--ppo-epochs", type=integer(minimum=1), default=4)


def reward_text(text):
    """The type of --reward-tokens: an empty text has no tokens, so every response would score 0."""
    if not text:
        raise argparse.ArgumentTypeError("expected a text whose tokens the toy reward counts, got ''")
    return text


# ---- shared pieces -----------------------------------------------------------------------------


def load_start_model(spec, device):
    """A checkpoint file, or OpenAI's GPT-2 by size or folder; dropout off, as fine-tuning here runs."""
    if os.path.isfile(spec):
        model, _ = model_from_checkpoint(spec)
    else:
        model = load_openai_gpt2(spec)
    model.cfg["drop_rate"] = 0.0
    for _, module in model.modules():
        if isinstance(module, Dropout):
            module.p = 0.0
        elif isinstance(module, MultiHeadAttention):
            module.dropout = 0.0
    return model.to(device=device)


def preference_loaders(args, model):
    """The book's loaders of the training and validation splits: batches of args.batch_size pairs."""
    from ..data import DataLoader
    from ..finetune import preference
    from ..finetune.instruct import split_instruction_data

    allow_identical = args.allow_identical or args.data is None  # the book's file holds 6 identical pairs
    data = preference.load_preference_data(args.data, allow_identical=allow_identical)
    train_data, _, val_data = split_instruction_data(data)
    tokenizer = get_tokenizer()

    def collate(batch):
        return preference.custom_collate_fn(batch, allowed_max_length=model.cfg["context_length"], device=args.device)

    def loader(entries, shuffle):
        dataset = preference.PreferenceDataset(entries, tokenizer, allow_identical=allow_identical)
        return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, drop_last=shuffle, collate_fn=collate,
                          seed=args.seed if shuffle else None)

    return loader(train_data, True), loader(val_data, False)


def write_metrics(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def plot(path, x_label, panels):
    """preference.plot_panels, or a note when matplotlib is missing; the path or None."""
    try:
        return plot_panels(path, x_label, panels)
    except RuntimeError as error:
        print(f"(no plot: {error})")
        return None


def interrupted(error, out):
    print(f"\nInterrupted: what was trained so far is in {out}", file=sys.stderr)
    return 128 + getattr(error, "signum", signal.SIGINT)


# ---- the commands ------------------------------------------------------------------------------


def run_dpo(args):
    from ..finetune import preference

    backend.manual_seed(args.seed)
    policy = load_start_model(args.model, args.device)
    reference = preference.make_reference_model(policy)
    train_loader, val_loader = preference_loaders(args, policy)
    optimizer = AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, CHECKPOINT_NAME)
    start = preference.evaluate_dpo_loss_loader(policy, reference, train_loader, val_loader, args.beta,
                                                args.eval_iter, args.reduction)
    print(f"DPO from {args.model}: {len(train_loader)} batches of {args.batch_size} pairs per epoch, beta {args.beta}; "
          f"before training: train loss {start['train_loss']:.4f}, val loss {start['val_loss']:.4f}")
    started = time.perf_counter()
    try:
        tracking = preference.train_model_dpo_simple(
            policy, reference, train_loader, val_loader, optimizer, args.epochs, args.beta, args.eval_freq,
            args.eval_iter, reduction=args.reduction, checkpoint_path=checkpoint, stop_at_step=args.max_steps,
            metrics_path=os.path.join(args.out, METRICS_NAME), checkpoint_metadata={"tokenizer": "gpt2"},
            progress=not args.no_progress)
    except KeyboardInterrupt as error:
        return interrupted(error, args.out)
    except TrainingDivergedError as error:
        print(error, file=sys.stderr)
        return 1
    steps = [i * args.eval_freq for i in range(len(tracking["train_losses"]))]
    margins = {split: [c - r for c, r in zip(tracking[f"{split}_chosen_rewards"], tracking[f"{split}_rejected_rewards"])]
               for split in ("train", "val")}
    if steps:
        print(f"Final (step {steps[-1]}): train loss {tracking['train_losses'][-1]:.3f}, "
              f"val loss {tracking['val_losses'][-1]:.3f}, train reward margin {margins['train'][-1]:.3f}, "
              f"val reward margin {margins['val'][-1]:.3f}; {time.perf_counter() - started:.1f} s")
        plot_path = plot(os.path.join(args.out, "dpo.png"), "step", [
            ("DPO loss", {"train": (steps, tracking["train_losses"]), "val": (steps, tracking["val_losses"])}),
            ("reward margin (chosen - rejected)", {"train": (steps, margins["train"]), "val": (steps, margins["val"])})])
        if plot_path:
            print(f"Plot: {plot_path}")
    print(f"Checkpoint: {checkpoint}")
    return 0


def run_reward(args):
    from ..finetune import preference

    backend.manual_seed(args.seed)
    reward_model = preference.make_reward_model(load_start_model(args.model, args.device))
    train_loader, val_loader = preference_loaders(args, reward_model)
    optimizer = AdamW(reward_model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    os.makedirs(args.out, exist_ok=True)
    before = preference.evaluate_reward_model(reward_model, val_loader)
    print(f"Reward model from {args.model}: {len(train_loader)} batches of {args.batch_size} pairs per epoch; "
          f"validation accuracy before training {before['accuracy'] * 100:.2f}%")
    started = time.perf_counter()
    try:
        history = preference.train_reward_model(
            reward_model, train_loader, val_loader, optimizer, args.epochs, args.eval_freq, args.eval_iter,
            stop_at_step=args.max_steps, metrics_path=os.path.join(args.out, METRICS_NAME),
            progress=not args.no_progress)
    except KeyboardInterrupt as error:
        return interrupted(error, args.out)
    except TrainingDivergedError as error:
        print(error, file=sys.stderr)
        return 1
    final = preference.evaluate_reward_model(reward_model, val_loader)
    path = os.path.join(args.out, REWARD_MODEL_NAME)
    preference.save_reward_model(path, reward_model, tokenizer="gpt2", val_accuracy=final["accuracy"])
    print(f"Validation: accuracy {final['accuracy'] * 100:.2f}% (before {before['accuracy'] * 100:.2f}%), "
          f"mean margin {final['margin']:.3f}, loss {final['loss']:.3f}; {time.perf_counter() - started:.1f} s")
    evals = [record for record in history if record["event"] == "eval"]
    if evals:
        steps = [record["step"] for record in evals]
        plot_path = plot(os.path.join(args.out, "reward.png"), "step", [
            ("pairwise loss", {split: (steps, [r[f"{split}_loss"] for r in evals]) for split in ("train", "val")}),
            ("preference accuracy", {split: (steps, [r[f"{split}_accuracy"] for r in evals])
                                     for split in ("train", "val")})])
        if plot_path:
            print(f"Plot: {plot_path}")
    print(f"Reward model: {path}")
    return 0


def token_share_reward(text, tokenizer):
    """The toy reward: the share of a response's tokens that are among the tokens of `text`."""
    targets = np.unique(tokenizer.encode(text))

    def reward_fn(prompt_ids, response_ids):
        return np.array([np.isin(response, targets).mean() for response in response_ids])

    return reward_fn


def reward_model_scores(reward_model):
    """reward_fn of a reward model: prompt + response, right-padded, scored at the last real token."""
    from ..finetune.preference import reward_scores
    from ..tensor import no_grad

    def reward_fn(prompt_ids, response_ids):
        sequences = [np.concatenate([p, r]) for p, r in zip(prompt_ids, response_ids)]
        ids = np.zeros((len(sequences), max(len(s) for s in sequences)), np.int64)
        mask = np.zeros(ids.shape, bool)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)], mask[row, :len(sequence)] = sequence, True
        with no_grad():
            return backend.to_host(reward_scores(reward_model, ids, mask).data)

    return reward_fn


def run_ppo(args):
    from ..finetune import ppo, preference
    from ..finetune.instruct import RESPONSE_HEAD, format_input, split_instruction_data

    backend.manual_seed(args.seed)
    policy = load_start_model(args.model, args.device)
    tokenizer = get_tokenizer()
    train_data = split_instruction_data(preference.load_preference_data(allow_identical=True))[0]
    prompts = [np.array(tokenizer.encode(format_input(entry) + RESPONSE_HEAD)) for entry in train_data]
    room = policy.cfg["context_length"] - args.response_length
    prompts = [p for p in prompts if len(p) <= room]
    if not prompts:
        raise SystemExit(f"no prompt leaves room for {args.response_length} response tokens in the context of "
                         f"{policy.cfg['context_length']}: lower --response-length")
    if args.reward_model is not None:
        reward_fn = reward_model_scores(preference.load_reward_model(args.reward_model).to(device=args.device))
    else:
        reward_fn = token_share_reward(args.reward_tokens, tokenizer)
    os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, CHECKPOINT_NAME)
    steps = args.steps if args.max_steps is None else min(args.steps, args.max_steps)
    print(f"PPO from {args.model}: {steps} steps of {args.batch_size} prompts (of {len(prompts)}), "
          f"{args.response_length} response tokens, KL coefficient {args.kl_coef} (target {args.target_kl})")
    started = time.perf_counter()
    try:
        history = ppo.train_ppo(policy, reward_fn, prompts, steps, args.response_length, lr=args.lr,
                                kl_coef=args.kl_coef, seed=args.seed, batch_size=args.batch_size,
                                ppo_epochs=args.ppo_epochs, target_kl=args.target_kl, eos_id=50256,
                                checkpoint_path=checkpoint, progress=not args.no_progress)
    except KeyboardInterrupt as error:
        return interrupted(error, args.out)
    except TrainingDivergedError as error:
        print(error, file=sys.stderr)
        return 1
    write_metrics(os.path.join(args.out, METRICS_NAME),
                  [{"step": i, **{key: values[i] for key, values in history.items()}} for i in range(steps)])
    first, last = np.mean(history["reward_mean"][:5]), np.mean(history["reward_mean"][-5:])
    print(f"Mean reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}; KL at the end "
          f"{history['kl'][-1]:.3f}; {time.perf_counter() - started:.1f} s")
    xs = list(range(steps))
    plot_path = plot(os.path.join(args.out, "ppo.png"), "PPO step", [
        ("mean reward", {"reward": (xs, history["reward_mean"])}),
        ("KL to the reference", {"KL": (xs, history["kl"])})])
    if plot_path:
        print(f"Plot: {plot_path}")
    print(f"Checkpoint: {checkpoint}")
    return 0
