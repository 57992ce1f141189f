"""Memory of loading a GPT-2 124M checkpoint: tl.load_checkpoint against reading the whole file.

Each way runs in a fresh child process: it builds the model unfilled (its pages not yet
touched), then loads the checkpoint while a thread samples the process's anonymous
resident memory (RssAnon) every millisecond. The figure is the peak above what the child
held before loading, over the bytes of the weights (and of AdamW's two moments with
--optimizer): 1.0 would be the loaded arrays alone. "whole file" is what loading did
before the memory map: safetensors' load_file, then load_state_dict.

    python benchmarks/loading.py               # weights only (a 622 MB checkpoint)
    python benchmarks/loading.py --optimizer   # with AdamW's state (a 1.9 GB checkpoint)
"""
import argparse
import os
import subprocess
import sys
import tempfile

CHILD = """
import sys, threading, time
import tinygrad_llm as tl

def rss_anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

path, way, with_optimizer = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model = tl.GPTModel(tl.GPT_CONFIG_124M, init_weights=False)
optimizer = tl.optim.AdamW(model.parameters()) if with_optimizer else None
loaded_bytes = sum(p.data.nbytes for p in model.parameters()) * (3 if with_optimizer else 1)
before, peak, done = rss_anon(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
start = time.perf_counter()
if way == "memory map":
    tl.load_checkpoint(path, model, optimizer)
else:
    from safetensors.numpy import load_file
    tensors = load_file(path)
    model.load_state_dict({name[len("model."):]: array for name, array in tensors.items() if name.startswith("model.")})
seconds = time.perf_counter() - start
done.set()
sampler.join()
peak[0] = max(peak[0], rss_anon())
print(f"{(peak[0] - before) / 2**20:.0f} {loaded_bytes / 2**20:.0f} {seconds:.2f}")
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", action="store_true", help="save and load AdamW's state too")
    args = parser.parse_args()
    import numpy as np

    import tinygrad_llm as tl

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "gpt2-124M.safetensors")
        model = tl.GPTModel(tl.GPT_CONFIG_124M, seed=0)
        optimizer = None
        if args.optimizer:
            optimizer = tl.optim.AdamW(model.parameters())
            for p in model.parameters():
                p.grad = np.zeros_like(p.data)
            optimizer.step()
        tl.save_checkpoint(path, model, optimizer)
        del model, optimizer
        print(f"checkpoint {os.path.getsize(path) / 2**20:.0f} MiB; load averages {os.getloadavg()}")
        print(f"{'way':<12} {'peak MiB':>9} {'loaded MiB':>11} {'peak/loaded':>12} {'seconds':>8}")
        ways = ["memory map"] + ([] if args.optimizer else ["whole file"])
        for way in ways:
            out = subprocess.run([sys.executable, "-c", CHILD, path, way, "1" if args.optimizer else "0"],
                                 capture_output=True, text=True, check=True).stdout.split()
            peak, loaded, seconds = float(out[0]), float(out[1]), float(out[2])
            print(f"{way:<12} {peak:>9.0f} {loaded:>11.0f} {peak / loaded:>12.2f} {seconds:>8.2f}")


if __name__ == "__main__":
    main()
