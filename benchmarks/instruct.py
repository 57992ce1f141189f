"""One instruction fine-tuning step (the book's chapter 7), tinygrad_llm against PyTorch eager.

GPT-2 medium (355M, qkv bias, dropout 0.0, as the book fine-tunes it) on batches of 8 real
entries of instruction-data through the book's collate (each batch as long as its longest
entry, about 80 tokens; pads ignored by the loss); a step is the forward pass,
cross-entropy over the kept targets, backward and AdamW (lr 5e-5, weight decay 0.1).
Random weights (no download): a step costs the same with any weights. PyTorch runs the
reference model on its fastest eager path (scaled_dot_product_attention, native
LayerNorm and GELU, fused AdamW) from the same weights.

The two alternate step by step in one process (each library's model, gradients and AdamW
state: the process reached 14.7 GB at 355M), so a change in the machine's load hits both
alike; the median step time is reported with the load average.

    python benchmarks/instruct.py                 # 355M, 6 timed steps each (about 15 GB)
    python benchmarks/instruct.py --config 124M   # GPT-2 small (about 5 GB)
"""
import argparse
import os
import statistics
import sys
import time

WARM_UP = 2
LR, WEIGHT_DECAY = 5e-5, 0.1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["124M", "355M"], default="355M")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per library (median reported)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for reference/

    import numpy as np
    import torch

    import tinygrad_llm as tl
    from reference.gpt import GPTModel as TorchGPTModel
    from reference.gpt import load_into_torch
    from tinygrad_llm.finetune.instruct import (create_instruction_loaders, load_instruction_data,
                                                split_instruction_data)
    from tinygrad_llm.tokenizers import get_gpt2_tokenizer
    from tinygrad_llm.train import calc_loss_batch

    cfg = tl.gpt2_config(args.config, qkv_bias=True, drop_rate=0.0)
    train_data, _, val_data = split_instruction_data(load_instruction_data())
    train_loader, _ = create_instruction_loaders(train_data, val_data, get_gpt2_tokenizer(), args.batch_size, seed=123)
    batches = list(train_loader)[:WARM_UP + args.steps]

    model = tl.GPTModel(cfg, seed=0)
    optimizer = tl.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    torch_model = load_into_torch(TorchGPTModel(cfg, fused=True), model.state_dict())
    torch_optimizer = torch.optim.AdamW(torch_model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    def ours(inputs, targets):
        optimizer.zero_grad()
        loss = calc_loss_batch(inputs, targets, model, None)
        loss.backward()
        optimizer.step()
        return loss.item()

    def pytorch(inputs, targets):
        torch_optimizer.zero_grad(set_to_none=True)
        logits = torch_model(torch.from_numpy(inputs))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).flatten())
        loss.backward()
        torch_optimizer.step()
        return loss.item()

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    times, losses = {"ours": [], "torch": []}, {"ours": [], "torch": []}
    for i, (inputs, targets) in enumerate(batches):
        for name, step in (("ours", ours), ("torch", pytorch)):
            start = time.perf_counter()
            losses[name].append(step(inputs, targets))
            if i >= WARM_UP:
                times[name].append(time.perf_counter() - start)
    lengths = [inputs.shape[1] for inputs, _ in batches[WARM_UP:]]
    tokens = statistics.mean(args.batch_size * t for t in lengths)
    print(f"GPT-2 {args.config} instruction step: batches of {args.batch_size} x {min(lengths)}-{max(lengths)} tokens "
          f"(mean {statistics.mean(lengths):.0f}); median of {args.steps} steps after {WARM_UP} warm-up steps; "
          f"torch threads {torch.get_num_threads()}")
    print(f"| {'library':<14} | {'s/step':>7} | {'tokens/s':>9} |")
    print(f"| {'-' * 14} | {'-' * 6}:| {'-' * 8}:|")
    for name in ("ours", "torch"):
        seconds = statistics.median(times[name])
        print(f"| {name:<14} | {seconds:7.2f} | {tokens / seconds:9.0f} |")
    print(f"ratio ours/torch tokens/s: {statistics.median(times['torch']) / statistics.median(times['ours']):.2f}")
    print(f"largest loss difference over the steps: {np.max(np.abs(np.subtract(losses['ours'], losses['torch']))):.2e}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
