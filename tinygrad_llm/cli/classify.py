"""`tinygrad-llm classify`: "spam" or "not spam" for each text, from a `finetune classify` checkpoint."""
import sys

from ..finetune.classify import classify_review, load_classifier
from .common import add_device_option, existing_file, get_tokenizer


def add_classify(subparsers):
    p = subparsers.add_parser(
        "classify", help="classify texts with a fine-tuned classifier (the book's classify_review)",
        description="Print the class of each text: the --text ones, else one text per line of standard input. "
                    "A text longer than the classifier's max_length is cut to it, as the book does.")
    p.add_argument("--checkpoint", required=True, type=existing_file,
                   help="a classifier written by `tinygrad-llm finetune classify`")
    p.add_argument("--text", action="append", help="a text to classify (repeatable)")
    add_device_option(p)
    p.set_defaults(run=run_classify)


def run_classify(args):
    model, settings = load_classifier(args.checkpoint)
    model.to(device=args.device)
    tokenizer = get_tokenizer()
    texts = args.text if args.text is not None else [line.rstrip("\n") for line in sys.stdin]
    for number, text in enumerate(texts, 1):
        if not text.strip():
            where = f"--text number {number}" if args.text is not None else f"line {number} of standard input"
            raise SystemExit(f"{where} is empty: there is nothing to classify")
    for text in texts:
        label = classify_review(text, model, tokenizer, args.device, max_length=settings["max_length"],
                                pad_token_id=settings["pad_token_id"], token=settings["token"])
        print(label)
    return 0
