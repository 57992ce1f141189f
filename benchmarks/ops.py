"""Forward + backward time of each fused op at GPT-2 124M shapes, tinygrad_llm against torch eager.

Shapes are one training step's: batch 2, context 256, 768 channels, 12 heads of size 64,
vocabulary 50257, all float32. Each op's inputs are made once; a timed run is the
forward, the backward from a fixed upstream gradient, and nothing else (gradients are
reset between runs, so accumulation is not timed). torch keeps its default thread count.
A ratio below 1 means tinygrad_llm is faster; the target is at most 1.5 for every op.

Both libraries run in one process, in blocks: a pause, a block of runs of ours, a pause, a
block of torch's, three rounds, the first run of each block untimed; the median of the
timed runs is reported. Rounds share a change in the machine's load between the two.
Blocks rather than run-by-run alternation, because torch's OpenMP threads keep spinning
for milliseconds after each op (libgomp's default wait policy) and take a core from
whatever runs next: alternating run by run, our softmax measured 4.0 ms, and 1.9 ms with
torch's threads told to sleep (OMP_WAIT_POLICY=PASSIVE, which slows torch's own softmax
from 1.1 to 1.2-1.3 ms, so it is not used here). --run-by-run measures the old way.

    python benchmarks/ops.py              # 9 timed runs per op and library
    python benchmarks/ops.py --runs 3     # quicker
    python benchmarks/ops.py --only layer_norm softmax   # the ops whose names start so
"""
import argparse
import statistics
import time

import numpy as np
import torch

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor, cpu

B, T, C, HEADS, VOCAB = 2, 256, 768, 12, 50257
TARGET_RATIO = 1.5


def leaves(rng, *shapes):
    """Float32 inputs as tinygrad_llm leaves and torch leaves holding the same values."""
    arrays = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
    return ([Tensor(a, requires_grad=True) for a in arrays],
            [torch.tensor(a, requires_grad=True) for a in arrays])


def fused_ops(rng):
    """(name, shape, ours, torch, inputs of ours, inputs of torch) for each op, made one at a
    time so that only one op's inputs and gradients are in memory."""
    ids = rng.integers(0, VOCAB, (B, T))
    targets = rng.integers(0, VOCAB, B * T)
    yield ("linear 768->3072", "(2,256,768)", F.linear, torch.nn.functional.linear,
           *leaves(rng, (B, T, C), (4 * C, C), (4 * C,)))
    yield ("linear 768->50257", "(2,256,768), no bias", F.linear, torch.nn.functional.linear,
           *leaves(rng, (B, T, C), (VOCAB, C)))
    yield ("embedding", "(2,256) ids, 50257x768", lambda w: F.embedding(ids, w),
           lambda w: torch.nn.functional.embedding(torch.from_numpy(ids), w), *leaves(rng, (VOCAB, C)))
    yield ("layer_norm", "(2,256,768)", F.layer_norm,
           lambda x, scale, shift: torch.nn.functional.layer_norm(x, (C,), scale, shift),
           *leaves(rng, (B, T, C), (C,), (C,)))
    yield ("gelu", "(2,256,3072)", F.gelu, lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
           *leaves(rng, (B, T, 4 * C)))
    yield ("softmax", "(2,12,256,256)", F.softmax, lambda x: torch.softmax(x, dim=-1),
           *leaves(rng, (B, HEADS, T, T)))
    yield ("log_softmax", "(512,50257)", F.log_softmax, lambda x: torch.log_softmax(x, dim=-1),
           *leaves(rng, (B * T, VOCAB)))
    yield ("cross_entropy", "(512,50257)", lambda x: F.cross_entropy(x, targets),
           lambda x: torch.nn.functional.cross_entropy(x, torch.from_numpy(targets)), *leaves(rng, (B * T, VOCAB)))
    yield ("attention, causal", "(2,12,256,64)", F.scaled_dot_product_attention,
           lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
           *leaves(rng, *[(B, HEADS, T, C // HEADS)] * 3))
    yield ("dropout p=0.1", "(2,256,768)", lambda x: F.dropout(x, 0.1), lambda x: torch.nn.functional.dropout(x, 0.1),
           *leaves(rng, (B, T, C)))


def timed_step(op, inputs, upstream):
    """Seconds for one forward and backward of `op` (gradients reset beforehand)."""
    for x in inputs:
        x.grad = None
    start = time.perf_counter()
    out = op(*inputs)
    out.backward(upstream)
    return time.perf_counter() - start


ROUNDS = 3
PAUSE_S = 0.05  # libgomp's threads spin for a few ms before they sleep


def timed_block(op, inputs, upstream, runs):
    """Seconds of `runs` consecutive runs after a pause and one untimed run."""
    time.sleep(PAUSE_S)
    timed_step(op, inputs, upstream)
    return [timed_step(op, inputs, upstream) for _ in range(runs)]


def compare(rng, runs, only=None, run_by_run=False):
    rows = []
    for name, shape, ours, theirs, ours_inputs, torch_inputs in fused_ops(rng):
        if only and not name.startswith(tuple(only)):
            continue
        out_shape = ours(*ours_inputs).shape
        upstream = rng.standard_normal(out_shape, dtype=np.float32)
        torch_upstream = torch.from_numpy(upstream)
        ours_times, torch_times = [], []
        if run_by_run:
            for run in range(runs + 1):  # the first run of each warms caches and allocators, untimed
                ours_time = timed_step(ours, ours_inputs, upstream)
                torch_time = timed_step(theirs, torch_inputs, torch_upstream)
                if run:
                    ours_times.append(ours_time)
                    torch_times.append(torch_time)
        else:
            for _ in range(ROUNDS):
                ours_times += timed_block(ours, ours_inputs, upstream, -(-runs // ROUNDS))
                torch_times += timed_block(theirs, torch_inputs, torch_upstream, -(-runs // ROUNDS))
        rows.append((name, shape, ours_times, torch_times))
    return rows


def matmul_gflops(runs, n=(512, 768, 3072)):
    """float32 matmul throughput at the MLP's shape (B*T, C) @ (C, 4C), NumPy and torch."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(n[:2], dtype=np.float32), rng.standard_normal(n[1:], dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flops = 2 * n[0] * n[1] * n[2]
    results = {}
    def numpy_matmul():  # on all of OpenBLAS's threads (tinygrad_llm keeps it at one beside its own)
        with cpu.blas_threads(cpu.get_num_threads()):
            return a @ b

    for name, matmul in (("NumPy", numpy_matmul), ("torch", lambda: ta @ tb)):
        matmul()
        times = []
        for _ in range(runs * 3):
            start = time.perf_counter()
            matmul()
            times.append(time.perf_counter() - start)
        results[name] = flops / statistics.median(times) / 1e9
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="timed runs per op and library (median reported)")
    parser.add_argument("--run-by-run", action="store_true",
                        help="alternate the libraries run by run instead of in blocks (see above)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="time only the ops whose names start so")
    args = parser.parse_args()

    rows = compare(np.random.default_rng(0), args.runs, args.only, args.run_by_run)
    order = "alternating run by run" if args.run_by_run else f"in blocks, {ROUNDS} rounds"
    print(f"fused ops, forward + backward, float32, median of {len(rows[0][2]) if rows else 0} runs {order} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads; NumPy {np.__version__})")
    # The ratio of the fastest runs is printed too: on a machine that other work shares, the
    # median can catch a busy spell that the best run of each library escaped.
    print(f"{'op':20s} {'shape':24s} {'ours ms':>9s} {'torch ms':>9s} {'ours/torch':>10s} {'best/best':>9s}")
    for name, shape, ours, theirs in rows:
        ratio = statistics.median(ours) / statistics.median(theirs)
        flag = "" if ratio <= TARGET_RATIO else f"  > {TARGET_RATIO}x"
        print(f"{name:20s} {shape:24s} {statistics.median(ours) * 1e3:9.2f} {statistics.median(theirs) * 1e3:9.2f} "
              f"{ratio:10.2f} {min(ours) / min(theirs):9.2f}{flag}")
    gflops = matmul_gflops(args.runs)
    print("float32 matmul (512,768) @ (768,3072): "
          + ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in gflops.items()))


if __name__ == "__main__":
    main()
