"""Where the time of a memory-bound op goes: NumPy's passes over memory, against a fused kernel.

torch runs layer_norm and softmax as fused kernels that touch each element about once per
direction. NumPy makes one pass over memory per elementwise operation, so these ops cost
at least the sum of their passes. This script times each kind of pass alone on one thread
at GPT-2 124M shapes, multiplies by how many of each `tinygrad_llm.functional` makes
(counted from the code, listed below), and sets that floor beside the op as implemented
(one thread, raw arrays, no autograd) and torch's fused op on one thread and on two.
Even perfect use of two cores would only halve the floor.

    python benchmarks/passes.py
"""
import argparse
import statistics
import time

import numpy as np
import torch

import tinygrad_llm.functional as F
from tinygrad_llm import cpu

# Passes per forward + backward, by kind, as functional.py makes them:
#   plain      a flat loop: a * b, a - b, a * (a vector tiled k rows wide)
#   per-row    a loop per row with a scalar per row: a - mean[:, None], a * rstd
#   row sum    a BLAS matrix-vector product: a @ ones, ones @ a, a @ scale
#   reduce     a whole-array min or max
#   exp        np.exp
PASSES = {
    "layer_norm": {"plain": 6, "per-row": 5, "row sum": 6, "reduce": 0, "exp": 0},
    "softmax": {"plain": 2, "per-row": 2, "row sum": 2, "reduce": 2, "exp": 1},
}
SHAPES = {"layer_norm": (512, 768), "softmax": (2 * 12 * 256, 256)}


def median_ms(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def pass_costs(shape, runs):
    """Milliseconds of one pass of each kind over a float32 array of `shape`, one thread."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32)
    out, per_row, ones = np.empty_like(a), rng.standard_normal((shape[0], 1), dtype=np.float32), np.ones(shape[1], np.float32)
    return {"plain": median_ms(lambda: np.multiply(a, b, out=out), runs),
            "per-row": median_ms(lambda: np.multiply(a, per_row, out=out), runs),
            "row sum": median_ms(lambda: a @ ones, runs),
            "reduce": median_ms(lambda: a.max(), runs),
            "exp": median_ms(lambda: np.exp(a, out=out), runs)}


def ops(rng):
    x, scale, shift = (rng.standard_normal(s, dtype=np.float32) for s in ((2, 256, 768), (768,), (768,)))
    scores = rng.standard_normal((2, 12, 256, 256), dtype=np.float32)
    yield ("layer_norm", F.layer_norm_forward, F.layer_norm_backward, (x, scale, shift),
           lambda x, scale, shift: torch.nn.functional.layer_norm(x, (768,), scale, shift))
    yield "softmax", F.softmax_forward, F.softmax_backward, (scores,), lambda x: torch.softmax(x, dim=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="timed runs per measurement (median reported)")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    rng = np.random.default_rng(0)
    print(f"float32, forward + backward, median of {args.runs}; milliseconds "
          f"(NumPy {np.__version__}, torch {torch.__version__})")
    for name, forward, backward, inputs, theirs in ops(rng):
        upstream = rng.standard_normal(inputs[0].shape, dtype=np.float32)
        leaves = [torch.tensor(a, requires_grad=True) for a in inputs]

        def torch_step():
            for leaf in leaves:
                leaf.grad = None
            theirs(*leaves).backward(torch.from_numpy(upstream))

        cpu.set_num_threads(1)
        costs = pass_costs(SHAPES[name], args.runs)
        floor = sum(PASSES[name][kind] * costs[kind] for kind in costs)
        ours_one = median_ms(lambda: backward(upstream, forward(*inputs)[1]), args.runs)
        torch.set_num_threads(1)
        torch_one = median_ms(torch_step, args.runs)
        torch.set_num_threads(threads)
        cpu.set_num_threads(threads)
        torch_all = median_ms(torch_step, args.runs)
        counts = ", ".join(f"{PASSES[name][kind]} {kind} x {costs[kind]:.3f}" for kind in costs if PASSES[name][kind])
        print(f"\n{name} {SHAPES[name]}: passes {counts}")
        print(f"  sum of the passes, 1 thread   {floor:7.3f}")
        print(f"  ours as implemented, 1 thread {ours_one:7.3f}")
        print(f"  torch fused, 1 thread         {torch_one:7.3f}   floor / torch {floor / torch_one:.2f}")
        print(f"  torch fused, {threads} threads        {torch_all:7.3f}   "
              f"floor / {threads} / torch {floor / threads / torch_all:.2f}")


if __name__ == "__main__":
    main()
