"""Text generation speed: GPT-2 124M, greedy, one prompt and then a batch of prompts of different lengths.

One prompt: batch 1, an 8-token prompt, 100 new tokens, three ways in one process on the
same random weights: tl.generate with the KV cache, tl.generate without it (every step
runs the whole sequence again), and Hugging Face transformers'
GPT2LMHeadModel.generate(use_cache=True, do_sample=False).

A batch: 8 prompts of 4 to 60 tokens, 100 new tokens each, in one call: tl.generate over
the list of prompts (left-padded, one KV cache) against transformers' batched generate
with left padding and its attention mask (the way its docs batch GPT-2), tokens/s counted
over all rows.

The transformers model is built from GPT2Config() (no download) and its weights are loaded
into ours, so both compute the same function. Each way runs once to warm up, then
`--repeats` rounds take the ways in turn; the best time of each is kept (the machine's other
load only ever slows a run down).

Targets: the cache at least 3x faster than no cache, and at least as fast as transformers,
for one prompt and for the batch.

    python benchmarks/generate.py              # the full benchmark (about two minutes on 2 cores)
    python benchmarks/generate.py --threads 1  # NumPy's BLAS and torch on one thread each
    python benchmarks/generate.py --quick      # 20 new tokens, one repeat: a smoke run
    python benchmarks/generate.py --only batch # the batch of prompts alone

One token's step is ~50 small matrix-vector products. With a multi-threaded BLAS each one
wakes the other threads; on a machine busy with other work a thread can wait for a core,
so the thread count matters here more than in training: --threads compares on equal terms.
"""
import argparse
import os
import tempfile
import time


def best_times(runs, repeats):
    """{name: (best seconds, output)} of each run: one warm-up each (allocations, BLAS threads,
    torch's first-call overheads), then `repeats` rounds that take every run in turn, so a
    change in the machine's load falls on all of them alike."""
    for run in runs.values():
        run(5)
    times, outputs = {name: [] for name in runs}, {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), outputs[name]) for name in runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20 new tokens, one repeat")
    parser.add_argument("--threads", type=int, help="BLAS threads for NumPy and torch (default: theirs)")
    parser.add_argument("--batch-lengths", type=int, nargs="+", default=[4, 12, 20, 28, 36, 44, 52, 60],
                        help="the prompt lengths of the batch (default: 8 prompts, 4 to 60 tokens)")
    parser.add_argument("--only", choices=["single", "batch"], help="run one of the two benchmarks")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 20, 1
    if args.threads:
        # OpenBLAS reads this when NumPy loads it, so it is set before the first import of NumPy.
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import tinygrad_llm as tl
    from tinygrad_llm.weights import load_hf_gpt2

    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(GPT2Config()).eval()
    hf_model.generation_config.eos_token_id = None  # random weights: never stop early
    hf_model.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        model = load_hf_gpt2(folder)
    context_size = model.cfg["context_length"]
    prompt = np.random.default_rng(0).integers(0, model.cfg["vocab_size"], (1, args.prompt_tokens))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only != "batch":
        single_prompt(args, model, hf_model, prompt, context_size)
    if args.only != "single":
        batch_of_prompts(args, model, hf_model, context_size)


def single_prompt(args, model, hf_model, prompt, context_size):
    import numpy as np
    import torch

    import tinygrad_llm as tl

    n = args.new_tokens

    def ours(use_cache):
        return lambda n=n: tl.generate(model, prompt, n, context_size, use_cache=use_cache)[0, -n:]

    def transformers(n=n):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor(prompt), max_new_tokens=n, do_sample=False, use_cache=True)
        return out[0, -n:].numpy()

    runs = {"tinygrad_llm, KV cache": ours(True), "tinygrad_llm, no cache": ours(False),
            "transformers, use_cache=True": transformers}
    results = best_times(runs, args.repeats)

    cached_time = results["tinygrad_llm, KV cache"][0]
    print(f"GPT-2 124M (random weights), batch 1, {args.prompt_tokens}-token prompt, {n} new tokens, greedy; "
          f"best of {args.repeats}; torch threads {torch.get_num_threads()}, "
          f"OpenBLAS threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}")
    print(f"| {'generation':<30} | {'seconds':>8} | {'tokens/s':>9} | {'time vs. KV cache':>17} |")
    print(f"| {'-' * 30} | {'-' * 8}:| {'-' * 9}:| {'-' * 17}:|")
    for name, (seconds, _) in results.items():
        print(f"| {name:<30} | {seconds:8.2f} | {n / seconds:9.1f} | {seconds / cached_time:16.2f}x |")
    same = all(np.array_equal(out, results["tinygrad_llm, KV cache"][1]) for _, out in results.values())
    print(f"same tokens in all three: {same}")


def batch_of_prompts(args, model, hf_model, context_size):
    import numpy as np
    import torch

    import tinygrad_llm as tl

    n, lengths = args.new_tokens, args.batch_lengths
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.cfg["vocab_size"], length) for length in lengths]
    longest = max(lengths)
    padded = np.zeros((len(prompts), longest), np.int64)  # left padding, as transformers wants for generate
    attention_mask = np.zeros((len(prompts), longest), np.int64)
    for row, mask, prompt in zip(padded, attention_mask, prompts):
        row[longest - len(prompt):], mask[longest - len(prompt):] = prompt, 1

    def ours(n=n):
        return np.stack([out[-n:] for out in tl.generate(model, prompts, n, context_size)])

    def transformers(n=n):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor(padded), attention_mask=torch.tensor(attention_mask),
                                    max_new_tokens=n, do_sample=False, use_cache=True)
        return out[:, -n:].numpy()

    runs = {"tinygrad_llm, one KV cache": ours, "transformers, left padding": transformers}
    results = best_times(runs, args.repeats)
    ours_time, theirs_time = results["tinygrad_llm, one KV cache"][0], results["transformers, left padding"][0]
    print(f"\nGPT-2 124M (random weights), a batch of {len(prompts)} prompts of {min(lengths)}-{longest} tokens, "
          f"{n} new tokens each, greedy; best of {args.repeats}; torch threads {torch.get_num_threads()}")
    print(f"| {'batched generation':<30} | {'seconds':>8} | {'tokens/s':>9} |")
    print(f"| {'-' * 30} | {'-' * 8}:| {'-' * 9}:|")
    for name, (seconds, _) in results.items():
        print(f"| {name:<30} | {seconds:8.2f} | {len(prompts) * n / seconds:9.1f} |")
    print(f"tinygrad_llm / transformers tokens/s: {theirs_time / ours_time:.2f}x")
    rows_same = [np.array_equal(a, b) for a, b in zip(results["tinygrad_llm, one KV cache"][1],
                                                       results["transformers, left padding"][1])]
    print(f"rows with the same tokens: {sum(rows_same)} of {len(rows_same)}")


if __name__ == "__main__":
    main()
