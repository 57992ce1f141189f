"""`tinygrad-llm info`: describe a checkpoint without loading its weights."""
import json
import math

import numpy as np

from ..checkpoint import check_train_state, read_checkpoint
from ..model import parameter_counts
from .common import existing_file


def add_info(subparsers):
    p = subparsers.add_parser("info", help="describe a checkpoint: config, parameters, memory, training state",
                              description="Print a checkpoint's model config, parameter counts, memory and "
                                          "training progress without loading the weights.")
    p.add_argument("--checkpoint", required=True, type=existing_file)
    p.set_defaults(run=run_info)


def run_info(args):
    info = read_checkpoint(args.checkpoint)
    cfg, tensors = info["config"], info["tensors"]
    counts = parameter_counts(cfg)
    model_bytes = sum(_nbytes(shape, dtype) for name, (shape, dtype) in tensors.items() if name.startswith("model."))
    optimizer_bytes = sum(_nbytes(shape, dtype) for name, (shape, dtype) in tensors.items() if name.startswith("optimizer."))
    print(f"checkpoint  {args.checkpoint} ({info['file_bytes'] / 2**20:.1f} MiB)")
    print("config      " + json.dumps(cfg))
    print(f"parameters  {counts['total']:,} ({counts['tied']:,} without the output head, as GPT-2 ties it)")
    print(f"memory      weights {model_bytes / 2**20:.1f} MiB, optimizer state {optimizer_bytes / 2**20:.1f} MiB"
          + (f" ({info['optimizer']['type']})" if info["optimizer"] else ""))
    state = info["metadata"].get("train_state")
    if state:
        check_train_state(state, args.checkpoint)
        evals = [record for record in state["history"] if record["event"] == "eval"]
        last = evals[-1] if evals else {}
        unit = next((key[:-len("_seen")] for key in last if key.endswith("_seen")), "items")
        losses = ", ".join(f"{key.replace('_', ' ')} {value:.3f}" for key, value in last.items() if key.endswith("_loss"))
        print(f"training    step {state['step']}, epoch {state['epoch']} + {state['batch']} batches, "
              f"{state['seen']:,} {unit} seen" + (f"; last {losses}" if losses else ""))
    return 0


def _nbytes(shape, dtype):
    return math.prod(shape) * np.dtype(dtype).itemsize
