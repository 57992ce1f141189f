"""The book's chapter 8 DPO run through the Python API, with the book's settings.

The book aligns the chapter 7 instruction-tuned gpt2-medium: batches of 8 preference pairs
(prompt masked), a frozen reference copy, AdamW lr 5e-6 and weight decay 0.01, 1 epoch
(116 steps), evaluating every 5 steps on 5 batches, beta 0.1, seed 123. Its log starts at
ln 2 = 0.6931 and reaches, at step 115, train/val loss about 0.61 and a validation reward
margin of 1.7-2.0.

    python examples/ch08_dpo.py --model OUT/checkpoint.safetensors   # an instruction-tuned checkpoint
    python examples/ch08_dpo.py --offline      # no GPT-2 weights: instruction-tune a small GPT here first

--offline trains a 4-layer GPT (emb 128, context 256) from scratch on the chapter 7 data
for --instruct-epochs epochs, then runs the book's DPO on it.
"""
import argparse
import time

import tinygrad_llm as tl
from tinygrad_llm.checkpoint import model_from_checkpoint
from tinygrad_llm.data import DataLoader
from tinygrad_llm.finetune import instruct, preference
from tinygrad_llm.tokenizers import get_gpt2_tokenizer
from tinygrad_llm.train import train_model_simple

SMALL_CONFIG = {"vocab_size": 50257, "context_length": 256, "emb_dim": 128, "n_heads": 4, "n_layers": 4,
                "drop_rate": 0.0, "qkv_bias": False}


def instruction_tuned_small_gpt(tokenizer, epochs):
    """A small GPT trained from scratch on the chapter 7 data (AdamW 5e-4, weight decay 0.1)."""
    train_data, _, val_data = instruct.split_instruction_data(instruct.load_instruction_data())

    def collate(batch):
        return instruct.custom_collate_fn(batch, allowed_max_length=SMALL_CONFIG["context_length"])

    train_loader = DataLoader(instruct.InstructionDataset(train_data, tokenizer), batch_size=8, shuffle=True,
                              drop_last=True, collate_fn=collate, seed=123)
    val_loader = DataLoader(instruct.InstructionDataset(val_data, tokenizer), batch_size=8, collate_fn=collate)
    model = tl.GPTModel(SMALL_CONFIG)
    optimizer = tl.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    train_model_simple(model, train_loader, val_loader, optimizer, None, epochs, 50, 5, None, None)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="an instruction-tuned checkpoint (e.g. from `tinygrad-llm finetune instruct`)")
    which.add_argument("--offline", action="store_true", help="instruction-tune a small GPT here first")
    parser.add_argument("--instruct-epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-6, help="DPO's learning rate (the book's 5e-6)")
    parser.add_argument("--save-instruct", help="with --offline: also save the instruction-tuned GPT here")
    parser.add_argument("--plot", default="ch08_dpo.png", help="where to write the loss and margin plot")
    args = parser.parse_args()

    tokenizer = get_gpt2_tokenizer()
    tl.manual_seed(123)
    if args.offline:
        policy = instruction_tuned_small_gpt(tokenizer, args.instruct_epochs)
        if args.save_instruct:
            tl.save_checkpoint(args.save_instruct, policy)
    else:
        policy, _ = model_from_checkpoint(args.model)
    # The book's data holds 6 pairs whose chosen and rejected answers are the same: kept, as the book does.
    data = preference.load_preference_data(allow_identical=True)
    train_data, _, val_data = instruct.split_instruction_data(data)

    def collate(batch):
        return preference.custom_collate_fn(batch, allowed_max_length=policy.cfg["context_length"])

    train_loader = DataLoader(preference.PreferenceDataset(train_data, tokenizer, allow_identical=True), batch_size=8,
                              shuffle=True, drop_last=True, collate_fn=collate)
    val_loader = DataLoader(preference.PreferenceDataset(val_data, tokenizer), batch_size=8, collate_fn=collate)
    reference = preference.make_reference_model(policy)

    tl.manual_seed(123)
    start = preference.evaluate_dpo_loss_loader(policy, reference, train_loader, val_loader, beta=0.1, eval_iter=5)
    print(f"Training loss: {start['train_loss']}\nValidation loss: {start['val_loss']}")
    optimizer = tl.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.01)
    started = time.perf_counter()
    tracking = preference.train_model_dpo_simple(policy, reference, train_loader, val_loader, optimizer, num_epochs=1,
                                                 beta=0.1, eval_freq=5, eval_iter=5,
                                                 start_context=instruct.format_input(val_data[2]), tokenizer=tokenizer)
    print(f"Training completed in {(time.perf_counter() - started) / 60:.2f} minutes.")
    steps = [5 * i for i in range(len(tracking["train_losses"]))]
    margins = {split: [c - r for c, r in zip(tracking[f"{split}_chosen_rewards"], tracking[f"{split}_rejected_rewards"])]
               for split in ("train", "val")}
    preference.plot_panels(args.plot, "step", [
        ("DPO loss", {"train": (steps, tracking["train_losses"]), "val": (steps, tracking["val_losses"])}),
        ("reward margin (chosen - rejected)", {"train": (steps, margins["train"]), "val": (steps, margins["val"])})])
    print(f"Plot: {args.plot}")


if __name__ == "__main__":
    main()
