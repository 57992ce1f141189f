"""`tinygrad-llm finetune classify`: the book's chapter 6 run, spam or not, from weights to an accuracy table."""
import json
import os
import signal
import sys
import time

from .. import backend
from ..checkpoint import model_from_checkpoint
from ..data import DataLoader
from ..finetune.classify import (TOKENS, TRAINABLE, SpamDataset, calc_accuracy_loader, create_balanced_dataset,
                                 load_sms_spam, plot_classifier_metrics, prepare_classifier, random_split,
                                 train_classifier_simple)
from ..model import GPT2_PRESETS, GPT2_SIZES, GPTModel
from ..optim import AdamW
from ..train import TrainingDivergedError
from .common import (METRICS_NAME, add_device_option, existing_file, get_tokenizer, integer, load_openai_gpt2,
                     number, output_folder)

CLASSIFIER_NAME = "classifier.safetensors"
ACCURACY_NAME = "accuracy.json"


def add_classify_task(tasks):
    p = tasks.add_parser(
        "classify", help="spam classification on the SMS Spam Collection (the book's chapter 6)",
        description="Fine-tune a GPT to tell spam from ham: the book's balanced 1,045 / 149 / 300 split, a 2-class "
                    "head, AdamW, loss every --eval-freq steps and accuracy after each epoch; then the accuracy on "
                    f"the whole sets. OUT receives {CLASSIFIER_NAME} (for `tinygrad-llm classify`; also written "
                    f"after each epoch and on Ctrl-C or SIGTERM), {METRICS_NAME}, {ACCURACY_NAME}, loss-plot.png "
                    "and accuracy-plot.png.")
    p.add_argument("--model", default="gpt2-small", metavar="SIZE|DIR|CHECKPOINT",
                   help="OpenAI's GPT-2 (gpt2-small ... gpt2-xl or 124M ..., downloaded on first use), a Hugging "
                        "Face folder, or a checkpoint of `tinygrad-llm pretrain` (default gpt2-small)")
    p.add_argument("--data", type=existing_file,
                   help="a file in the SMS Spam Collection's format (label TAB text per line; default: "
                        "the registry's sms-spam-collection)")
    p.add_argument("--trainable", choices=TRAINABLE, default="last-block",
                   help="what is trained besides the new head: last-block (and the final norm, the book's), "
                        "last-2, all, head (default last-block)")
    p.add_argument("--token", choices=TOKENS, default="last",
                   help="the position classified: last (the book's), last-real (the last non-pad token), mean")
    p.add_argument("--lora-rank", type=integer(minimum=1), metavar="R",
                   help="train LoRA adapters of rank R on every Linear instead (appendix E; --trainable is then "
                        "ignored)")
    p.add_argument("--lora-alpha", type=number(minimum=0.0, above=True), metavar="A",
                   help="LoRA's alpha (default: the rank)")
    p.add_argument("--epochs", type=integer(minimum=1), default=5, help="default 5")
    p.add_argument("--lr", type=number(minimum=0.0, above=True), default=5e-5,
                   help="AdamW's learning rate (default 5e-5)")
    p.add_argument("--weight-decay", type=number(minimum=0.0), default=0.1, help="default 0.1")
    p.add_argument("--batch-size", type=integer(minimum=1), default=8, help="default 8")
    p.add_argument("--accumulation-steps", type=integer(minimum=1), default=1,
                   help="micro-batches per step (default 1)")
    p.add_argument("--max-length", type=integer(minimum=1),
                   help="tokens per text (default: the longest training text, 120 for the book's split; at most "
                        "the model's context)")
    p.add_argument("--eval-freq", type=integer(minimum=1), default=50, help="default 50")
    p.add_argument("--eval-iter", type=integer(minimum=1), default=5, help="batches per evaluation (default 5)")
    p.add_argument("--seed", type=integer(minimum=0), default=123,
                   help="seeds the new head, shuffling and dropout (default 123)")
    p.add_argument("--out", required=True, type=output_folder,
                   help="folder for the classifier, the metrics log and the plots")
    add_device_option(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_classify_task)


def _base_model(source):
    """GPT-2 by size or folder, or a pretrain checkpoint; the book fine-tunes with dropout off."""
    if source in GPT2_PRESETS or source in GPT2_SIZES or os.path.isdir(source):
        model = load_openai_gpt2(source)
    elif os.path.isfile(source):
        model, _ = model_from_checkpoint(source)
    else:
        raise SystemExit(f"--model {source!r} is neither a GPT-2 size ({', '.join(GPT2_PRESETS)}), a folder nor a "
                         "checkpoint file")
    without_dropout = GPTModel({**model.cfg, "drop_rate": 0.0}, dtype=model.dtype, init_weights=False)
    return without_dropout.load_state_dict(model.state_dict())


def run_classify_task(args):
    if args.lora_alpha is not None and args.lora_rank is None:
        raise SystemExit("--lora-alpha needs --lora-rank")
    started = time.perf_counter()
    tokenizer = get_tokenizer()
    train_rows, val_rows, test_rows = random_split(create_balanced_dataset(load_sms_spam(args.data)), 0.7, 0.1)
    train_dataset = SpamDataset(train_rows, tokenizer, max_length=args.max_length)
    val_dataset = SpamDataset(val_rows, tokenizer, max_length=train_dataset.max_length)
    test_dataset = SpamDataset(test_rows, tokenizer, max_length=train_dataset.max_length)

    model = _base_model(args.model)
    if train_dataset.max_length > model.cfg["context_length"]:
        raise SystemExit(f"the texts are padded to {train_dataset.max_length} tokens, more than the model's context "
                         f"of {model.cfg['context_length']}: pass --max-length {model.cfg['context_length']}")
    backend.manual_seed(args.seed)
    train_loader = DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_dataset, batch_size=args.batch_size)
    test_loader = DataLoader(test_dataset, batch_size=args.batch_size)
    lora = None
    if args.lora_rank is not None:
        from ..lora import replace_linear_with_lora

        prepare_classifier(model, trainable="head", seed=args.seed)
        for p in model.parameters():
            p.requires_grad = False  # the book's appendix E: adapters on every Linear, the new head's too
        lora = {"rank": args.lora_rank, "alpha": args.lora_rank if args.lora_alpha is None else args.lora_alpha}
        replace_linear_with_lora(model, lora["rank"], lora["alpha"])
    else:
        prepare_classifier(model, trainable=args.trainable, seed=args.seed)
    model.to(device=args.device)
    settings = {"num_classes": 2, "token": args.token, "max_length": train_dataset.max_length,
                "pad_token_id": train_dataset.pad_token_id, "lora": lora, "tokenizer": "gpt2"}
    trained = "LoRA adapters" if lora else f"trainable {args.trainable}"
    print(f"Fine-tuning {args.model} to classify spam ({trained}: {model.num_parameters(trainable=True):,} "
          f"trainable parameters of {model.num_parameters():,}); {len(train_dataset)} / {len(val_dataset)} / "
          f"{len(test_dataset)} texts of {train_dataset.max_length} tokens, {len(train_loader)} batches per epoch")

    optimizer = AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    checkpoint = os.path.join(args.out, CLASSIFIER_NAME)
    os.makedirs(args.out, exist_ok=True)
    try:
        train_classifier_simple(model, train_loader, val_loader, optimizer, args.device, args.epochs, args.eval_freq,
                                args.eval_iter, token=args.token, accumulation_steps=args.accumulation_steps,
                                checkpoint_path=checkpoint, checkpoint_metadata={"classifier": settings},
                                metrics_path=os.path.join(args.out, METRICS_NAME), progress=not args.no_progress)
    except KeyboardInterrupt as error:
        print(f"\nInterrupted: {checkpoint} holds the classifier after the last finished step", file=sys.stderr)
        return 128 + getattr(error, "signum", signal.SIGINT)
    except TrainingDivergedError as error:
        print(error, file=sys.stderr)
        return 1
    minutes = (time.perf_counter() - started) / 60

    accuracies = {name: calc_accuracy_loader(loader, model, args.device, token=args.token)
                  for name, loader in (("training", train_loader), ("validation", val_loader), ("test", test_loader))}
    print("\n| data | accuracy |\n| --- | --- |")
    for name, accuracy in accuracies.items():
        print(f"| {name} | {accuracy * 100:.2f}% |")
    with open(os.path.join(args.out, ACCURACY_NAME), "w") as f:
        json.dump({**accuracies, "minutes": minutes, "trainable_parameters": model.num_parameters(trainable=True)}, f)
    print(f"Classifier: {checkpoint} ({minutes:.2f} min)")
    try:
        for path in plot_classifier_metrics(os.path.join(args.out, METRICS_NAME), args.out):
            print(f"Plot: {path}")
    except RuntimeError as error:  # matplotlib is optional
        print(error, file=sys.stderr)
    return 0
