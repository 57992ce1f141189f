"""One GPT training step, tinygrad_llm against PyTorch eager: tokens/s, peak memory, model FLOPs.

A step is what pretraining runs: forward, cross-entropy over the whole vocabulary,
backward, AdamW update. Both models start from the same weights. PyTorch runs the
reference model on its fastest eager path (scaled_dot_product_attention, native
LayerNorm and GELU, the fused CPU AdamW). The two alternate step by step in one process,
so a change in the machine's load hits both alike; the median step time is reported.

Each library also runs alone in a fresh child process: its peak memory there (the peak
resident set of its address space, VmHWM, imports included) is not mixed with the
other's, and its step time there is with its own allocator settings. tinygrad_llm makes
glibc reuse freed memory, process-wide (tinygrad_llm.cpu.reuse_freed_memory), so in the
shared process the torch steps profit from it too.

Model FLOPs per token follow the PaLM paper's count: 6 x (matmul parameters) for the
forward and backward matmuls, plus 12 x layers x context x emb_dim for attention's
two (B, H, T, T) products. The machine's float32 matmul peak is measured at the model's
own matmul shapes, with NumPy and with torch, taking the faster.

    python benchmarks/train_step.py            # 124M (context 256, batch 2) and the tiny config
    python benchmarks/train_step.py --quick    # the tiny config, few steps: a smoke run
    python benchmarks/train_step.py --threads 1 --config 124M   # one core each (a busy machine)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "124M": ({"vocab_size": 50257, "context_length": 256, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
              "drop_rate": 0.1, "qkv_bias": False}, 2),
    "tiny": ({"vocab_size": 50257, "context_length": 128, "emb_dim": 256, "n_heads": 4, "n_layers": 4,
              "drop_rate": 0.1, "qkv_bias": False}, 8),
}
LR, WEIGHT_DECAY = 4e-4, 0.1
WARM_UP = 2  # untimed steps: the heap grows to its working size over the first one or two


def batch(cfg, batch_size, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    shape = (batch_size, cfg["context_length"])
    return rng.integers(0, cfg["vocab_size"], shape), rng.integers(0, cfg["vocab_size"], shape)


def ours(cfg, seed=0):
    """A step function for tinygrad_llm's model, and the model (to copy its weights)."""
    import tinygrad_llm as tl
    import tinygrad_llm.functional as F

    model = tl.GPTModel(cfg, seed=seed)
    optimizer = tl.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(idx, targets):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(idx), targets)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, model


def pytorch(cfg, state_dict=None):
    """A step function for the reference model in torch eager, on its fastest path."""
    import torch
    from reference.gpt import GPTModel, load_into_torch

    if "TINYGRAD_LLM_NUM_THREADS" in os.environ:  # --threads: the same count for both libraries
        torch.set_num_threads(int(os.environ["TINYGRAD_LLM_NUM_THREADS"]))

    model = GPTModel(cfg, fused=True)
    if state_dict is not None:
        load_into_torch(model, state_dict)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    def step(idx, targets):
        optimizer.zero_grad(set_to_none=True)
        logits = model(torch.from_numpy(idx))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).flatten())
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def model_flops_per_token(cfg):
    C, L, V, T = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"], cfg["context_length"]
    matmul_params = L * (3 * C * C + C * C + 8 * C * C) + C * V  # Q|K|V, out_proj, feed-forward, head
    return 6 * matmul_params + 12 * L * T * C


def matmul_peak(cfg, batch_size, repeats=3):
    """float32 GFLOP/s over the model's matmuls (x W^T, dout W, dout^T x for each linear shape)."""
    import numpy as np
    import torch

    from tinygrad_llm import cpu

    N, C, V = batch_size * cfg["context_length"], cfg["emb_dim"], cfg["vocab_size"]
    rng = np.random.default_rng(0)
    best = {}
    for name, lib, mm in (("numpy", np, np.matmul), ("torch", torch, torch.mm)):
        seconds = flops = 0.0
        for n_out, n_in in ((3 * C, C), (C, C), (4 * C, C), (C, 4 * C), (V, C)):
            x, w, d = (lib.asarray(rng.standard_normal(shape, dtype=np.float32))
                       for shape in ((N, n_in), (n_out, n_in), (N, n_out)))
            for a, b in ((x, w.T), (d, w), (d.T, x)):
                times = []
                for _ in range(repeats):
                    # NumPy's BLAS on all its threads (tinygrad_llm keeps it at one beside its own)
                    with cpu.blas_threads(cpu.get_num_threads()):
                        start = time.perf_counter()
                        mm(a, b)
                        times.append(time.perf_counter() - start)
                seconds += min(times)
                flops += 2.0 * N * n_out * n_in
        best[name] = flops / seconds / 1e9
    return max(best.values()), best


def peak_rss_mb():
    # VmHWM belongs to this address space; ru_maxrss would carry over the parent's peak
    # through fork and exec.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_own_process(library, config, steps):
    """Median step seconds and peak RSS (MB) of one library alone in a fresh interpreter."""
    command = [sys.executable, __file__, "--child", library, "--config", config, "--steps", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
    return json.loads(result.stdout.strip().splitlines()[-1])


def child(library, config, steps):
    cfg, batch_size = CONFIGS[config]
    step = ours(cfg)[0] if library == "ours" else pytorch(cfg)
    times = []
    for i in range(WARM_UP + steps):
        idx, targets = batch(cfg, batch_size, seed=i)
        start = time.perf_counter()
        step(idx, targets)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times[WARM_UP:]), "peak_rss_mb": peak_rss_mb()}))


def compare(config, steps):
    import torch

    import tinygrad_llm.cpu as tl_cpu

    cfg, batch_size = CONFIGS[config]
    peak, peaks = matmul_peak(cfg, batch_size)
    ours_step, model = ours(cfg)
    torch_step = pytorch(cfg, model.state_dict())
    times = {"ours": [], "torch": []}
    for i in range(WARM_UP + steps):
        idx, targets = batch(cfg, batch_size, seed=i)
        for name, step in (("ours", ours_step), ("torch", torch_step)):
            start = time.perf_counter()
            step(idx, targets)
            if i >= WARM_UP:
                times[name].append(time.perf_counter() - start)
    del ours_step, torch_step, model
    # The peak again, after the steps: the best of the two, so a busy moment does not lower it.
    later, later_peaks = matmul_peak(cfg, batch_size)
    peak, peaks = max(peak, later), {name: max(peaks[name], later_peaks[name]) for name in peaks}
    own = {name: in_own_process(name, config, steps) for name in ("ours", "torch")}

    tokens = batch_size * cfg["context_length"]
    flops = model_flops_per_token(cfg) * tokens
    rows = {"ours, alternating": (statistics.median(times["ours"]), None),
            "torch, alternating": (statistics.median(times["torch"]), None),
            "ours, own process": (own["ours"]["seconds"], own["ours"]["peak_rss_mb"]),
            "torch, own process": (own["torch"]["seconds"], own["torch"]["peak_rss_mb"])}
    print(f"\n== {config}: batch {batch_size} x context {cfg['context_length']}, emb {cfg['emb_dim']}, "
          f"{cfg['n_layers']} layers, {cfg['n_heads']} heads, vocab {cfg['vocab_size']}, dropout {cfg['drop_rate']} ==")
    print(f"threads: tinygrad_llm {tl_cpu.get_num_threads()}, torch {torch.get_num_threads()}; "
          f"median of {steps} steps after {WARM_UP} warm-up steps")
    print(f"model FLOPs per step: {flops / 1e9:.1f} GFLOP; float32 matmul peak at these shapes: {peak:.0f} GFLOP/s "
          f"(numpy {peaks['numpy']:.0f}, torch {peaks['torch']:.0f})")
    print(f"{'':20}{'step s':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'% of peak':>11}{'peak RSS MB':>13}")
    for name, (seconds, rss) in rows.items():
        achieved = flops / seconds / 1e9
        print(f"{name:20}{seconds:9.3f}{tokens / seconds:10.0f}{achieved:9.1f}{100 * achieved / peak:10.0f}%"
              f"{'' if rss is None else f'{rss:.0f}':>13}")
    ratio = {kind: rows[f"torch, {kind}"][0] / rows[f"ours, {kind}"][0] for kind in ("alternating", "own process")}
    print(f"ratio ours/torch tokens/s: {ratio['alternating']:.2f} alternating in one process, "
          f"{ratio['own process']:.2f} in own processes; peak memory ours/torch: "
          f"{own['ours']['peak_rss_mb'] / own['torch']['peak_rss_mb']:.2f}")
    print("(alternating: tinygrad_llm's allocator setting (tinygrad_llm.cpu.reuse_freed_memory) is process-wide, so the "
          "torch steps reuse freed memory too; own process: each library with its own allocator defaults)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny config only, 2 timed steps")
    parser.add_argument("--config", choices=sorted(CONFIGS), action="append",
                        help="which config(s) to run (default: 124M and tiny)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per library (median reported)")
    parser.add_argument("--threads", type=int, help="threads for both libraries (default: all CPUs)")
    parser.add_argument("--child", choices=("ours", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:  # before NumPy is imported: OpenBLAS reads its variable once
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["TINYGRAD_LLM_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for reference/
    if args.child:
        child(args.child, args.config[0], args.steps)
        return
    configs, steps = (["tiny"], 2) if args.quick else (args.config or ["124M", "tiny"], args.steps)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    for config in configs:
        compare(config, steps)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
