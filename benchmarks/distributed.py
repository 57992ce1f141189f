"""Data-parallel scaling: training tokens/s on 1 and 2 ranks, and the all-reduce's time per step.

Each rank trains on --batch rows of --context tokens per step (the global batch grows with
the ranks), through the one training loop, on random token ids; the first step is left out
of the timing. "all-reduce" is the time inside the all-reduce per step (the flat gradient
buffer, 4 bytes per parameter), which holds the wait for the slower rank; "alone" times the
same all-reduce with both ranks ready (after a barrier). The copies into and out of the
buffer are in neither. "by" names the engine: MPI's Allreduce over a host buffer, or with
--device cuda NCCL's over a buffer on the GPU (the clock stops when the GPU is done).

    python benchmarks/distributed.py [--configs tiny 124M] [--ranks 1 2] [--steps 4] [--device cuda]

On the CPU the ranks share this machine's cores: on 2 cores, 2 ranks split the cores the
1-rank run used alone, so the figure shows what the all-reduce costs, not a speed-up. With
--device cuda each rank takes a GPU of its own (as many ranks as GPUs at most).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def worker(args):
    import tinygrad_llm as tl
    from tinygrad_llm import distributed
    from tinygrad_llm.cli.common import model_config
    from tinygrad_llm.train import calc_loss_batch, train

    world = distributed.current()
    world.select_device(args.device)
    config = {**model_config(args.config), "context_length": args.context, "drop_rate": 0.0}
    tl.manual_seed(0)
    model = tl.GPTModel(config).to(device=args.device)
    rng = np.random.default_rng(world.rank)
    batches = [(ids[:, :-1], ids[:, 1:]) for ids in
               (rng.integers(0, config["vocab_size"], (args.batch, args.context + 1)) for _ in range(args.steps + 1))]
    step_ends = []

    def loss_fn(model, batch):
        step_ends.append(time.perf_counter())
        return calc_loss_batch(*batch, model, None)

    train(model, tl.optim.AdamW(model.parameters(), lr=1e-4), batches, loss_fn, 1, progress=False)
    if args.device == "cuda":
        tl.backend.current_stream().synchronize()  # the last step's kernels may still be queued
    seconds = time.perf_counter() - step_ends[1]  # from the start of step 2 to the end
    # The all-reduce of step 1 is left out too: its share is the average one.
    communication = world.communication_seconds * args.steps / (args.steps + 1)
    alone = allreduce_alone(world, model) if world.size > 1 else 0.0
    if world.rank == 0:
        print(json.dumps({"tokens_per_s": world.size * args.batch * args.context * args.steps / seconds,
                          "step_s": seconds / args.steps, "allreduce_s": communication / args.steps,
                          "allreduce_alone_s": alone, "parameters": sum(p.data.size for p in model.parameters()),
                          "by": "-" if world.size == 1 else "NCCL" if world.nccl_communicator else "MPI"}))


def allreduce_alone(world, model, repeats=3):
    """The median time of the gradient all-reduce with every rank already waiting at a barrier:
    the cost of moving the data, without the wait for a slower rank that a step's figure holds."""
    times = []
    for _ in range(repeats):
        world.comm.Barrier()
        before = world.communication_seconds
        world.allreduce_gradients(model.parameters())
        times.append(world.communication_seconds - before)
    return sorted(times)[repeats // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "124M"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    mpiexec = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if mpiexec is None:
        raise SystemExit("no mpiexec: pip install 'tinygrad_llm[distributed]'")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print(f"batch {args.batch} x {args.context} tokens per rank, {args.steps} timed steps, device {args.device}, "
          f"{os.cpu_count()} cores")
    print(f"{'config':<8}{'ranks':>6}{'tokens/s':>11}{'s/step':>9}{'all-reduce s/step':>19}{'all-reduce alone s':>20}"
          f"{'by':>6}")
    for config in args.configs:
        for ranks in args.ranks:
            command = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker", "--config", config,
                       "--steps", str(args.steps), "--batch", str(args.batch), "--context", str(args.context),
                       "--device", args.device]
            result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"{config:<8}{ranks:>6}{figures['tokens_per_s']:>11.0f}{figures['step_s']:>9.2f}"
                  f"{figures['allreduce_s']:>19.3f}{figures['allreduce_alone_s']:>20.3f}{figures['by']:>6}", flush=True)


if __name__ == "__main__":
    main()
