"""The book's chapter 6 offline: spam classification on a GPT this library pretrains itself.

The book fine-tunes OpenAI's GPT-2 124M, which needs a network. Here everything starts from
the texts of the training split alone (1,045 messages; validation and test texts are never
seen before evaluation): a byte-level BPE tokenizer of 2,048 tokens is trained on them, a
small GPT is pretrained on them (next-token prediction, no labels), and then it is
fine-tuned as chapter 6 does: a 2-class head, AdamW, batches of 8 of the book's
1,045 / 149 / 300 split, each text padded to the longest training text. It prints the
accuracy table of section 6.7 (whole sets), the time, and the trainable parameters, and
writes the metrics logs and the loss and accuracy plots to --out.

    python examples/ch06_classify.py                       # the offline result in the README
    python examples/ch06_classify.py --lora-rank 16 --lora-alpha 16
    python examples/ch06_classify.py --quick               # a smoke run of a few steps
"""
import argparse
import os
import time

import tinygrad_llm as tl
from tinygrad_llm.data import DataLoader, create_dataloader_v1
from tinygrad_llm.finetune.classify import (TOKENS, TRAINABLE, SpamDataset, calc_accuracy_loader,
                                            create_balanced_dataset, load_sms_spam, plot_classifier_metrics,
                                            prepare_classifier, random_split, train_classifier_simple)
from tinygrad_llm.tokenizers import BPETokenizer
from tinygrad_llm.train import train_model_simple

END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 2048
# A GPT small enough to pretrain in minutes on two cores; its context holds the longest text.
CONFIG = {"vocab_size": VOCAB_SIZE, "context_length": 256, "emb_dim": 128, "n_heads": 4, "n_layers": 4,
          "drop_rate": 0.1, "qkv_bias": False}
WINDOW = 128  # pretraining windows (stride 64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    # 5 epochs at lr 2e-4: the best validation accuracy of the settings tried (README)
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=2e-4, help="fine-tuning learning rate")
    parser.add_argument("--trainable", choices=TRAINABLE, default="all")
    parser.add_argument("--token", choices=TOKENS, default="mean")
    parser.add_argument("--drop-rate", type=float, default=0.1, help="dropout while fine-tuning")
    parser.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead (appendix E)")
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--out", default="runs/ch06", help="folder for the metrics logs and the plots")
    parser.add_argument("--quick", action="store_true", help="a few steps of each phase: a smoke run")
    args = parser.parse_args()
    started, cpu_started = time.perf_counter(), time.process_time()
    os.makedirs(args.out, exist_ok=True)

    train_rows, val_rows, test_rows = random_split(create_balanced_dataset(load_sms_spam()), 0.7, 0.1)
    if args.quick:
        train_rows, val_rows, test_rows = train_rows[:64], val_rows[:16], test_rows[:16]
    text = END_OF_TEXT.join(text for _, text in train_rows)
    tokenizer = BPETokenizer.train(text, VOCAB_SIZE, special_tokens=[END_OF_TEXT])
    pad_token_id = tokenizer.eot_token

    # 1. Pretraining on the training texts only, joined by end-of-text tokens.
    tl.manual_seed(123)
    model = tl.GPTModel(CONFIG)
    lm_train = create_dataloader_v1(text, batch_size=8, max_length=WINDOW, stride=WINDOW // 2, shuffle=True,
                                    drop_last=True, tokenizer=tokenizer)
    lm_val = create_dataloader_v1(END_OF_TEXT.join(text for _, text in val_rows), batch_size=8, max_length=WINDOW,
                                  stride=WINDOW, shuffle=False, drop_last=False, tokenizer=tokenizer)
    optimizer = tl.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    print(f"Pretraining a {model.num_parameters():,}-parameter GPT on the {len(train_rows)} training texts "
          f"({len(lm_train)} batches of 8 x {WINDOW} tokens per epoch)")
    train_model_simple(model, lm_train, lm_val, optimizer, None, 1 if args.quick else args.pretrain_epochs,
                       eval_freq=len(lm_train), eval_iter=3, start_context=None, tokenizer=None,
                       warmup_steps=len(lm_train) // 2, cosine_decay=True, min_lr=1e-4, grad_clip=1.0,
                       stop_at_step=3 if args.quick else None, metrics_path=os.path.join(args.out, "pretrain.jsonl"))
    pretrain_minutes = (time.perf_counter() - started) / 60

    # 2. Fine-tuning: the same weights in a model with the fine-tuning dropout, the book's surgery, its loop.
    pretrained, model = model, tl.GPTModel({**CONFIG, "drop_rate": args.drop_rate}, init_weights=False)
    model.load_state_dict(pretrained.state_dict())
    train_dataset = SpamDataset(train_rows, tokenizer, pad_token_id=pad_token_id)
    val_dataset = SpamDataset(val_rows, tokenizer, max_length=train_dataset.max_length, pad_token_id=pad_token_id)
    test_dataset = SpamDataset(test_rows, tokenizer, max_length=train_dataset.max_length, pad_token_id=pad_token_id)
    tl.manual_seed(123)
    train_loader = DataLoader(train_dataset, batch_size=8, shuffle=True, drop_last=True)
    val_loader = DataLoader(val_dataset, batch_size=8)
    test_loader = DataLoader(test_dataset, batch_size=8)
    if args.lora_rank:
        from tinygrad_llm.lora import replace_linear_with_lora

        prepare_classifier(model, trainable="head")
        for p in model.parameters():
            p.requires_grad = False  # appendix E: adapters on every Linear, the new head's too
        replace_linear_with_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
        method = f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g}"
    else:
        prepare_classifier(model, trainable=args.trainable)
        method = f"trainable {args.trainable}"
    trainable = model.num_parameters(trainable=True)
    print(f"Fine-tuning ({method}, token {args.token}): {trainable:,} trainable parameters "
          f"of {model.num_parameters():,}; texts of {train_dataset.max_length} tokens")
    optimizer = tl.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    train_classifier_simple(model, train_loader, val_loader, optimizer, None, num_epochs=1 if args.quick else args.epochs,
                            eval_freq=50, eval_iter=5, token=args.token, pad_token_id=pad_token_id,
                            stop_at_step=3 if args.quick else None, metrics_path=os.path.join(args.out, "metrics.jsonl"))

    accuracies = [calc_accuracy_loader(loader, model, None, token=args.token, pad_token_id=pad_token_id)
                  for loader in (train_loader, val_loader, test_loader)]
    minutes, cpu_minutes = (time.perf_counter() - started) / 60, (time.process_time() - cpu_started) / 60
    print("\n| data | accuracy |\n| --- | --- |")
    for name, accuracy in zip(("training", "validation", "test"), accuracies):
        print(f"| {name} | {accuracy * 100:.2f}% |")
    print(f"\n{minutes:.2f} min in all (pretraining {pretrain_minutes:.2f}), {cpu_minutes:.2f} min of CPU time, "
          f"load average {os.getloadavg()[0]:.1f}; {trainable:,} trainable parameters ({method})")
    for path in plot_classifier_metrics(os.path.join(args.out, "metrics.jsonl"), args.out):
        print(f"Plot: {path}")


if __name__ == "__main__":
    main()
