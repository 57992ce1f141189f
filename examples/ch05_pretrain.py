"""The book's chapter 5 pretraining run through the Python API.

GPT_CONFIG_124M with a 256-token context, dropout 0.1 and no qkv bias, trained on The
Verdict (90/10 split) with batches of 2 windows of 256 tokens (stride 256), AdamW at lr 4e-4
and weight decay 0.1 for 10 epochs, evaluating every 5 steps on 5 batches, seed 123. The
book reports an initial loss of about 10.99 and, after 10 epochs, train about 0.39 and
validation about 6.45.

    python examples/ch05_pretrain.py            # the full run (a benchmark: many minutes on a CPU)
    python examples/ch05_pretrain.py --quick    # one epoch of a 2-layer model: a smoke run
"""
import argparse
import time

import tinygrad_llm as tl
from tinygrad_llm.data import create_dataloader_v1
from tinygrad_llm.generate import generate, text_to_token_ids, token_ids_to_text
from tinygrad_llm.tokenizers import get_gpt2_tokenizer
from tinygrad_llm.train import calc_loss_loader, plot_losses, train_model_simple

GPT_CONFIG_124M = {**tl.GPT_CONFIG_124M, "context_length": 256, "drop_rate": 0.1, "qkv_bias": False}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one epoch of a 2-layer model")
    parser.add_argument("--plot", default="ch05_losses.png", help="where to write the loss plot")
    parser.add_argument("--device", default=tl.backend.default_device(), choices=tl.backend.DEVICES)
    args = parser.parse_args()
    cfg, num_epochs = GPT_CONFIG_124M, 10
    if args.quick:
        cfg, num_epochs = {**cfg, "n_layers": 2}, 1

    with open(tl.datasets.path("the-verdict"), encoding="utf-8") as f:
        text_data = f.read()
    split_idx = int(0.90 * len(text_data))
    tokenizer = get_gpt2_tokenizer()

    tl.manual_seed(123)
    train_loader = create_dataloader_v1(text_data[:split_idx], batch_size=2, max_length=cfg["context_length"],
                                        stride=cfg["context_length"], drop_last=True, shuffle=True)
    val_loader = create_dataloader_v1(text_data[split_idx:], batch_size=2, max_length=cfg["context_length"],
                                      stride=cfg["context_length"], drop_last=False, shuffle=False)
    model = tl.GPTModel(cfg).to(device=args.device)
    optimizer = tl.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)

    model.eval()  # section 5.1.3: the untrained model's losses, dropout off (the book: 10.988 and 10.981)
    print(f"Before training: train loss {calc_loss_loader(train_loader, model, args.device):.3f}, "
          f"val loss {calc_loss_loader(val_loader, model, args.device):.3f}")

    start = time.perf_counter()
    train_losses, val_losses, tokens_seen = train_model_simple(
        model, train_loader, val_loader, optimizer, args.device, num_epochs=num_epochs, eval_freq=5, eval_iter=5,
        start_context="Every effort moves you", tokenizer=tokenizer)
    minutes = (time.perf_counter() - start) / 60
    print(f"Training completed in {minutes:.2f} minutes on {args.device}.")
    print("train losses:", [round(loss, 3) for loss in train_losses])
    print("val losses:  ", [round(loss, 3) for loss in val_losses])

    epochs_seen = [num_epochs * i / max(len(train_losses) - 1, 1) for i in range(len(train_losses))]  # the book's linspace
    print(f"Loss plot: {plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, args.plot)}")
    token_ids = generate(model, text_to_token_ids("Every effort moves you", tokenizer), max_new_tokens=25,
                         context_size=cfg["context_length"], temperature=1.4, top_k=25, seed=123)
    print("Sample (temperature 1.4, top-k 25):", token_ids_to_text(token_ids, tokenizer))


if __name__ == "__main__":
    main()
