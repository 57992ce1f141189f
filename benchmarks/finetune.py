"""One chapter 6 classification step, tinygrad_llm against PyTorch eager: seconds, ratio, peak memory.

The book's shapes: GPT-2 124M (qkv_bias, dropout 0), a batch of 8 texts of 120 tokens, a
2-class head, everything frozen but the last block and the final norm, AdamW (lr 5e-5,
weight decay 0.1): forward, cross-entropy of the last position's logits, backward, update.
With --lora the step trains rank-16 adapters on every Linear instead (appendix E).

PyTorch runs the book's code on the reference model (reference/gpt.py, attention and
LayerNorm written out as the book writes them) and, as a second row, its fastest eager
path (fused=True: scaled_dot_product_attention, native LayerNorm and GELU). A frozen part
costs torch nothing in its backward either: autograd records no graph where nothing
requires a gradient, which tinygrad_llm does as well. All three start from the same
weights and alternate step by step in one process, so the machine's load hits them
alike; the median step is reported. Peak memory is each library alone in a fresh child
process (the peak resident set, VmHWM, imports included).

    python benchmarks/finetune.py             # 124M, B=8, T=120, last block trainable
    python benchmarks/finetune.py --lora      # the LoRA step
    python benchmarks/finetune.py --quick     # a 2-layer model, few steps: a smoke run
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

CFG_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
            "drop_rate": 0.0, "qkv_bias": True}
BATCH, LENGTH = 8, 120
LR, WEIGHT_DECAY, RANK, ALPHA = 5e-5, 0.1, 16, 16
WARM_UP = 2


def config(quick):
    return {**CFG_124M, "n_layers": 2} if quick else CFG_124M


def batch(cfg, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg["vocab_size"], (BATCH, LENGTH)), rng.integers(0, 2, BATCH)


def ours(cfg, lora, seed=0):
    """A step function for tinygrad_llm's classifier, and the model (to copy its weights)."""
    import tinygrad_llm as tl
    from tinygrad_llm.finetune.classify import calc_loss_batch, prepare_classifier

    model = prepare_classifier(tl.GPTModel(cfg, seed=seed), trainable="head" if lora else "last-block", seed=seed)
    if lora:
        from tinygrad_llm.lora import replace_linear_with_lora

        for p in model.parameters():
            p.requires_grad = False
        replace_linear_with_lora(model, RANK, ALPHA)
    optimizer = tl.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(idx, targets):
        optimizer.zero_grad()
        loss = calc_loss_batch(idx, targets, model, None)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, model


def pytorch(cfg, lora, fused, state_dict=None):
    """The same step on the reference model in torch eager: the book's code (fused=False) or torch's fastest."""
    import torch

    from reference.classify import prepare_classifier
    from reference.gpt import GPTModel, load_into_torch

    model = GPTModel(cfg, fused=fused)
    head = {"weight": np.zeros((2, cfg["emb_dim"]), np.float32), "bias": np.zeros(2, np.float32)}
    if state_dict is not None:
        load_into_torch(model, {**{k: v for k, v in state_dict.items() if not k.startswith("out_head")},
                                "out_head.weight": np.zeros((cfg["vocab_size"], cfg["emb_dim"]), np.float32)})
        head = {"weight": state_dict["out_head.weight"], "bias": state_dict["out_head.bias"]}
    prepare_classifier(model, head, trainable="head" if lora else "last-block")
    if lora:
        from reference.lora import replace_linear_with_lora

        for p in model.parameters():
            p.requires_grad = False
        replace_linear_with_lora(model, RANK, ALPHA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(idx, targets):
        optimizer.zero_grad()
        logits = model(torch.from_numpy(idx))[:, -1, :]
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(targets))
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def peak_rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


LIBRARIES = {"ours": lambda cfg, lora: ours(cfg, lora)[0],
             "torch (book's code)": lambda cfg, lora: pytorch(cfg, lora, fused=False),
             "torch (fused)": lambda cfg, lora: pytorch(cfg, lora, fused=True)}


def child(library, quick, lora, steps):
    cfg = config(quick)
    step = LIBRARIES[library](cfg, lora)
    times = []
    for i in range(WARM_UP + steps):
        idx, targets = batch(cfg, i)
        start = time.perf_counter()
        step(idx, targets)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times[WARM_UP:]), "peak_rss_mb": peak_rss_mb()}))


def in_own_process(library, args):
    command = [sys.executable, __file__, "--child", library, "--steps", str(args.steps)]
    command += ["--quick"] * args.quick + ["--lora"] * args.lora
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(args):
    import torch

    cfg = config(args.quick)
    ours_step, model = ours(cfg, args.lora)
    state = model.state_dict()
    if args.lora:  # the adapters start at B = 0, so the base weights and the head are the shared start
        state = {k.replace(".linear.", "."): v for k, v in state.items() if ".lora." not in k}
    steps = {"ours": ours_step,
             "torch (book's code)": pytorch(cfg, args.lora, fused=False, state_dict=state),
             "torch (fused)": pytorch(cfg, args.lora, fused=True, state_dict=state)}
    times = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    for i in range(WARM_UP + args.steps):
        idx, targets = batch(cfg, i)
        for name, step in steps.items():
            start = time.perf_counter()
            losses[name].append(step(idx, targets))
            if i >= WARM_UP:
                times[name].append(time.perf_counter() - start)
    trainable = model.num_parameters(trainable=True)
    del steps, ours_step, model
    own = {name: in_own_process(name, args) for name in LIBRARIES}

    what = f"LoRA rank {RANK}" if args.lora else "last block + final norm"
    print(f"\n== classification step: GPT-2 {'2-layer' if args.quick else '124M'}, batch {BATCH} x {LENGTH} tokens, "
          f"{what} trainable ({trainable:,} parameters), AdamW ==")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.steps} steps after "
          f"{WARM_UP} warm-up steps; load average {os.getloadavg()[0]:.1f}")
    print(f"first losses: " + ", ".join(f"{name} {values[0]:.6f}" for name, values in losses.items()))
    print(f"{'':22}{'alternating s':>14}{'own process s':>15}{'peak RSS MB':>13}")
    for name in LIBRARIES:
        print(f"{name:22}{statistics.median(times[name]):14.3f}{own[name]['seconds']:15.3f}"
              f"{own[name]['peak_rss_mb']:13.0f}")
    for name in ("torch (book's code)", "torch (fused)"):
        print(f"speed ratio ours vs {name}: {statistics.median(times[name]) / statistics.median(times['ours']):.2f} "
              f"alternating, {own[name]['seconds'] / own['ours']['seconds']:.2f} in own processes; "
              f"peak memory ours/{name.split()[0]}: {own['ours']['peak_rss_mb'] / own[name]['peak_rss_mb']:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a 2-layer model")
    parser.add_argument("--lora", action="store_true", help=f"train LoRA adapters (rank {RANK}) instead")
    parser.add_argument("--child", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick, args.lora, args.steps)
    else:
        compare(args)


if __name__ == "__main__":
    main()
