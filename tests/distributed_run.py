"""Training run by the distributed tests, with or without mpiexec; rank 0 writes what it saw.

    [mpiexec -n N] python tests/distributed_run.py OUT.json --batch B --steps K [--dtype float64]
        [--dropout P] [--checkpoint PATH --stop-at S --resume] [--kill-rank R --kill-at-step S] [--raise-rank R]
        [--term-rank R] [--device cuda --cuda-standin [--no-nccl] [--gpus G]]

Every rank draws global batches of N*B rows from one seeded loader and trains on its rows;
OUT.json gets the per-step loss of the global batch (the ranks' losses averaged), the
evaluation records and the final weights. --cuda-standin makes device "cuda" the test
suite's CPU stand-in for CuPy (a machine of G GPUs, default 2; --no-nccl: a CuPy without
NCCL); OUT.json then also gets, from every rank, the stand-in's host <-> device copies and
NCCL all-reduces during training.
"""
import argparse
import json
import os
import signal

import tinygrad_llm as tl
from tinygrad_llm import distributed
from tinygrad_llm.data import DataLoader, GPTDatasetV1
from tinygrad_llm.tokenizers import get_gpt2_tokenizer
from tinygrad_llm.train import TrainingInterrupted, calc_loss_batch, calc_loss_loader, train

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--batch", type=int, required=True)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--dtype", default="float32")
parser.add_argument("--dropout", type=float, default=0.0)
parser.add_argument("--checkpoint")
parser.add_argument("--stop-at", type=int)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--kill-rank", type=int)
parser.add_argument("--kill-at-step", type=int)
parser.add_argument("--raise-rank", type=int)
parser.add_argument("--term-rank", type=int)
parser.add_argument("--device", default="cpu")
parser.add_argument("--cuda-standin", action="store_true")
parser.add_argument("--no-nccl", action="store_true")
parser.add_argument("--gpus", type=int, default=2)
args = parser.parse_args()
if args.cuda_standin:
    from tests import cupy_standin

    tl.backend.use_cuda_module(cupy_standin)
    cupy_standin.gpu_count = args.gpus
    cupy_standin.cuda.nccl.available = not args.no_nccl

distributed.supervise_rank()
world = distributed.current()
world.select_device(args.device)
text = tl.datasets.path("the-verdict").read_text(encoding="utf-8")[:6000]
loader = DataLoader(GPTDatasetV1(text, get_gpt2_tokenizer("tiktoken"), 8, 8), args.batch * world.size, shuffle=True,
                    drop_last=True, seed=7)
rows = loader if world.size == 1 else distributed.RankBatches(loader, world)
tl.manual_seed(3)
model = tl.GPTModel({"vocab_size": 50257, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
                     "drop_rate": args.dropout, "qkv_bias": False}, dtype=args.dtype).to(device=args.device)
tl.manual_seed(distributed.rank_seed(11, world.rank))
optimizer = tl.optim.AdamW(model.parameters(), lr=1e-2)
losses = []


def loss_fn(model, batch):
    if world.rank == args.kill_rank and len(losses) == args.kill_at_step:
        os.kill(os.getpid(), signal.SIGKILL)
    if world.rank == args.raise_rank and len(losses) == 2:
        raise ValueError("made to fail")
    if world.rank == args.term_rank and len(losses) == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # this rank alone: the loop stops every rank after this step
    loss = calc_loss_batch(*batch, model, args.device)
    losses.append(world.average({"loss": loss.item()})["loss"])
    return loss


interrupted = None
if args.cuda_standin:
    cupy_standin.reset_transfers()
    cupy_standin.allreduces.clear()
try:
    with world.ending_together():
        history = train(model, optimizer, rows, loss_fn, num_epochs=args.steps // len(rows) + 1,
                        evaluate=lambda: {"train_loss": calc_loss_loader(rows, model, args.device, num_batches=2)},
                        eval_freq=2, stop_at_step=args.stop_at or args.steps, checkpoint_path=args.checkpoint,
                        resume=args.resume, save_every=2 if args.checkpoint else None, progress=False)
except TrainingInterrupted as error:
    interrupted, history = str(error), []
standin = world.gather({"transfers": dict(cupy_standin.transfers), "nccl_allreduces": list(cupy_standin.allreduces),
                        "gpu": cupy_standin.cuda.runtime.getDevice()} if args.cuda_standin else None)
if world.rank == 0:
    with open(args.out, "w") as f:
        json.dump({"losses": losses, "history": history, "interrupted": interrupted, "standin_by_rank": standin,
                   "parameters": sum(p.data.size for p in model.parameters()),
                   "gradients": sum(p.requires_grad for p in model.parameters()),
                   "weights": {name: w.tolist() for name, w in model.state_dict().items()}}, f)
