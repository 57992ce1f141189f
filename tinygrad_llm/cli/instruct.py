"""`tinygrad-llm finetune instruct`: the book's chapter 7 run, from weights to scored responses."""
import json
import os
import signal
import sys
import time

from .. import backend, datasets
from ..checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from ..finetune.instruct import (create_instruction_loaders, finetune_instruct, format_input, generate_responses,
                                 load_instruction_data, response_metrics, set_drop_rate, split_instruction_data,
                                 split_loss, write_responses)
from ..lora import merge_lora, save_lora
from ..train import TrainingDivergedError, evaluate_model, plot_losses
from .common import (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, add_device_option, get_tokenizer, integer,
                     load_openai_gpt2, number, output_folder)

# finetune instruct's settings and their defaults: the book's chapter 7 run.
INSTRUCT_DEFAULTS = {
    "model": "gpt2-medium", "data": "instruction-data", "epochs": 2, "batch_size": 8, "lr": 5e-5,
    "weight_decay": 0.1, "eval_freq": 5, "eval_iter": 5, "seed": 123, "drop_rate": 0.0,
    "allowed_max_length": 1024, "mask_instruction": False, "lora_rank": None, "lora_alpha": None,
    "accumulation_steps": 1,
}
MODEL_NAME = "model.safetensors"  # the fine-tuned weights alone (LoRA merged): for chat and evaluate
LORA_NAME = "lora.safetensors"
RESPONSES_NAME = "instruction-data-with-response.json"
RESULTS_NAME = "results.json"


def add_instruct(tasks):
    p = tasks.add_parser(
        "instruct", help="instruction fine-tuning on the Alpaca-style data (the book's chapter 7)",
        description="Fine-tune a GPT on instruction/response pairs (the book's 935/110/55 split of "
                    "instruction-data), printing train/val loss every --eval-freq steps and a response after "
                    "each epoch; then answer the 110 test instructions and score them offline. OUT receives "
                    f"{CHECKPOINT_NAME} (the training state, for --resume), {MODEL_NAME} (the weights, for "
                    f"`chat` and `evaluate`), {METRICS_NAME}, {PLOT_NAME}, {RESPONSES_NAME} and {RESULTS_NAME}.")
    d = INSTRUCT_DEFAULTS
    # Defaults are applied later, so --resume can tell a flag given on the command line from a default.
    p.add_argument("--model", metavar="SIZE|DIR|CHECKPOINT",
                   help="OpenAI's GPT-2 (gpt2-small ... gpt2-xl, 124M ..., downloaded on first use, which needs "
                        "a network, or a Hugging Face folder) or a checkpoint of this library "
                        f"(default {d['model']})")
    p.add_argument("--data", help=f"a registered data set or a JSON file of entries (default {d['data']})")
    p.add_argument("--epochs", type=integer(minimum=0), help=f"default {d['epochs']} (0: only the responses of the model as given)")
    p.add_argument("--batch-size", type=integer(minimum=1), help=f"default {d['batch_size']}")
    p.add_argument("--accumulation-steps", type=integer(minimum=1), metavar="K",
                   help="add up the gradients of K batches per optimizer step (default 1)")
    p.add_argument("--lr", type=number(minimum=0.0, above=True), help=f"AdamW's learning rate (default {d['lr']})")
    p.add_argument("--weight-decay", type=number(minimum=0.0), help=f"default {d['weight_decay']}")
    p.add_argument("--eval-freq", type=integer(minimum=1), help=f"evaluate every this many steps (default {d['eval_freq']})")
    p.add_argument("--eval-iter", type=integer(minimum=1), help=f"batches per evaluation (default {d['eval_iter']})")
    p.add_argument("--seed", type=integer(minimum=0), help=f"seeds shuffling, dropout and the adapters (default {d['seed']})")
    p.add_argument("--drop-rate", type=number(minimum=0.0, maximum=1.0, below=True), help=f"dropout while fine-tuning (default {d['drop_rate']}, the book's)")
    p.add_argument("--allowed-max-length", type=integer(minimum=1),
                   help="cut each training example to this many tokens (default 1024, at most the context)")
    p.add_argument("--mask-instruction", action="store_const", const=True,
                   help="exercise 7.2: the loss counts the response's tokens only")
    p.add_argument("--lora-rank", type=integer(minimum=1), metavar="R", help="train appendix E's rank-R adapters on every Linear "
                                                              "instead of all weights")
    p.add_argument("--lora-alpha", type=number(minimum=0.0, above=True), help="the adapters' alpha (default: the rank)")
    p.add_argument("--max-new-tokens", type=integer(minimum=1), default=256, help="the longest test response (default 256)")
    p.add_argument("--response-batch-size", type=integer(minimum=1), default=8, help="test prompts generated at once (default 8)")
    p.add_argument("--out", required=True, type=output_folder,
                   help="folder for the checkpoints, metrics, plot and responses")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT with its saved settings")
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_instruct)


def instruct_settings(args, checkpoint):
    """The run's settings: the defaults overridden by the flags given, or with --resume the saved ones."""
    given = {key: getattr(args, key) for key in INSTRUCT_DEFAULTS if getattr(args, key) is not None}
    if not args.resume:
        return {**INSTRUCT_DEFAULTS, **given}
    if not os.path.isfile(checkpoint):
        raise SystemExit(f"--resume: there is no checkpoint {checkpoint} to continue")
    settings = read_checkpoint(checkpoint)["metadata"].get("instruct_run")
    if settings is None:
        raise SystemExit(f"--resume: {checkpoint} was not written by finetune instruct, so there is no run to continue")
    conflicts = [f"--{key.replace('_', '-')} ({value!r}, saved {settings[key]!r})"
                 for key, value in given.items() if settings[key] != value]
    if conflicts:
        raise SystemExit(f"--resume continues the saved run unchanged, but these flags differ from it: "
                         f"{', '.join(conflicts)}")
    return settings


def check_settings(s):
    """The run's numbers; the flags' option types checked them, but --resume reads them from a checkpoint."""
    for key in ("batch_size", "eval_freq", "eval_iter", "accumulation_steps", "allowed_max_length"):
        if s[key] < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if s["epochs"] < 0:
        raise SystemExit(f"--epochs must be >= 0, got {s['epochs']}")
    if s["lora_rank"] is not None and s["lora_rank"] < 1:
        raise SystemExit(f"--lora-rank must be >= 1, got {s['lora_rank']}")
    if not 0.0 <= s["drop_rate"] < 1.0:
        raise SystemExit(f"--drop-rate must be in [0, 1), got {s['drop_rate']}")


def load_model(source):
    """A checkpoint file of this library, or OpenAI's GPT-2 by size or Hugging Face folder."""
    if os.path.isfile(source):
        return model_from_checkpoint(source)[0]
    return load_openai_gpt2(source)


def run_instruct(args):
    os.makedirs(args.out, exist_ok=True)
    checkpoint = os.path.join(args.out, CHECKPOINT_NAME)
    s = instruct_settings(args, checkpoint)
    check_settings(s)
    data = load_instruction_data(s["data"] if os.path.isfile(s["data"]) else datasets.path(s["data"]))
    train_data, test_data, val_data = split_instruction_data(data)
    if not train_data or not val_data or not test_data:
        raise SystemExit(f"--data {s['data']} has {len(data)} entries: too few for the 85/10/5 split "
                         f"({len(train_data)}/{len(test_data)}/{len(val_data)})")
    backend.manual_seed(s["seed"])
    model = set_drop_rate(load_model(s["model"]), s["drop_rate"]).to(device=args.device)
    tokenizer = get_tokenizer()
    context = model.cfg["context_length"]
    allowed_max_length = min(s["allowed_max_length"], context)
    train_loader, val_loader = create_instruction_loaders(
        train_data, val_data, tokenizer, s["batch_size"], seed=s["seed"], mask_instruction=s["mask_instruction"],
        allowed_max_length=allowed_max_length)
    if len(train_loader) == 0:
        raise SystemExit(f"the {len(train_data)} training entries make no full batch of --batch-size "
                         f"{s['batch_size']}: lower it")
    print(f"{'Resuming' if args.resume else 'Fine-tuning'} {s['model']} on {len(train_data)} instructions "
          f"({len(train_loader)} batches of {s['batch_size']} per epoch, {s['epochs']} epochs"
          f"{', LoRA rank ' + str(s['lora_rank']) if s['lora_rank'] else ''}"
          f"{', instruction masked' if s['mask_instruction'] else ''}) -> {args.out}")

    if not args.resume and s["epochs"] > 0:
        # The book's section 7.6 measures the model as given first: 3.826 / 3.762 for GPT-2 medium.
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, None, s["eval_iter"])
        print(f"Initial: train loss {train_loss:.3f}, val loss {val_loss:.3f} ({s['eval_iter']} batches each)")
    started = time.perf_counter()
    try:
        train_losses, val_losses, tokens_seen = finetune_instruct(
            model, train_loader, val_loader, s["epochs"], lr=s["lr"], weight_decay=s["weight_decay"],
            eval_freq=s["eval_freq"], eval_iter=s["eval_iter"], start_context=format_input(val_data[0]),
            tokenizer=tokenizer, lora_rank=s["lora_rank"], lora_alpha=s["lora_alpha"],
            accumulation_steps=s["accumulation_steps"], checkpoint_path=checkpoint, resume=args.resume,
            checkpoint_metadata={"instruct_run": s, "tokenizer": "gpt2"},
            metrics_path=os.path.join(args.out, METRICS_NAME), progress=not args.no_progress)
    except KeyboardInterrupt as error:
        print(f"\nInterrupted: the checkpoint {checkpoint} holds the last finished step; continue with\n"
              f"  tinygrad-llm finetune instruct --out {args.out} --resume", file=sys.stderr)
        return 128 + getattr(error, "signum", signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM
    except TrainingDivergedError as error:
        print(error, file=sys.stderr)
        return 1
    if train_losses:
        print(f"Final: train loss {train_losses[-1]:.3f}, val loss {val_losses[-1]:.3f}; "
              f"training {(time.perf_counter() - started) / 60:.2f} min")
        epochs_seen = [s["epochs"] * i / max(len(train_losses) - 1, 1) for i in range(len(train_losses))]
        print(f"Loss plot: {plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, os.path.join(args.out, PLOT_NAME))}")
    if s["lora_rank"] is not None:
        print(f"LoRA adapters: {save_lora(os.path.join(args.out, LORA_NAME), model)}")
        merge_lora(model)
    save_checkpoint(os.path.join(args.out, MODEL_NAME), model, tokenizer="gpt2")
    print(f"Fine-tuned weights: {os.path.join(args.out, MODEL_NAME)}")

    started = time.perf_counter()
    responses = generate_responses(model, tokenizer, test_data, args.max_new_tokens, args.response_batch_size,
                                   progress=not args.no_progress)
    path = write_responses(os.path.join(args.out, RESPONSES_NAME), test_data, responses)
    print(f"Responses to the {len(test_data)} test instructions ({(time.perf_counter() - started) / 60:.2f} min): {path}")
    entries = [{**entry, "model_response": response} for entry, response in zip(test_data, responses)]
    results = {**split_loss(model, test_data, tokenizer, s["batch_size"], s["mask_instruction"], allowed_max_length),
               **response_metrics(entries)}
    with open(os.path.join(args.out, RESULTS_NAME), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(f"Test split: loss {results['loss']:.3f}, perplexity {results['perplexity']:.2f}, exact match "
          f"{results['exact_match']:.3f}, token-F1 {results['token_f1']:.3f}\n"
          f"Judge them with: tinygrad-llm evaluate --responses {path} --judge")
    return 0
