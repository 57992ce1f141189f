"""CPU against GPU on the same code: one table of GPT-2 training steps and KV-cache generation.

Rows: tinygrad_llm on NumPy (CPU), torch eager on the CPU, tinygrad_llm on CuPy (GPU) with
its fused kernels, without them (TINYGRAD_LLM_CUDA_KERNELS=0) and with TF32 matmuls, torch
eager on the GPU in strict FP32 and with TF32. Each row runs in its own fresh process, one
after the other, so its peak memory is its own. The GPU rows appear when CuPy finds a GPU
and torch was built with CUDA.

A training step is forward, cross-entropy over the vocabulary, backward, gradient clipping
to norm 1.0 and AdamW, from the same random weights and batches in both libraries, dropout
0.1 as GPT_CONFIG_124M. Generation is greedy with a KV cache: batch 1, a 16-token prompt,
128 new tokens (torch: the reference model's modules with a cache written out below).

tokens/s is the median step's; MFU = tokens/s x model FLOPs per token (6 x matmul
parameters + 12 x layers x context x emb_dim, the PaLM count) / peak: the GPU's dense
peak (H100/H200: FP32 67 TFLOP/s, TF32 495) or, elsewhere, a float32 matmul measured in
the same process. Peak memory: the process's peak resident set on the CPU; on the GPU the
bytes the allocator holds at the end (CuPy's memory pool, torch's max_memory_reserved).
"vs torch" divides a row's tokens/s by torch's on the same device and precision.

    python benchmarks/devices.py                    # every device here, 124M (and 355M on a GPU)
    python benchmarks/devices.py --quick            # a tiny config, 2 steps: a smoke run
    python benchmarks/devices.py --rows cupy-gpu torch-gpu --configs 124M
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import model_flops_per_token, peak_rss_mb  # noqa: E402

CONFIGS = {
    "124M": {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
             "drop_rate": 0.1, "qkv_bias": False},
    "355M": {"vocab_size": 50257, "context_length": 1024, "emb_dim": 1024, "n_heads": 16, "n_layers": 24,
             "drop_rate": 0.1, "qkv_bias": False},
    "tiny": {"vocab_size": 50257, "context_length": 128, "emb_dim": 128, "n_heads": 4, "n_layers": 2,
             "drop_rate": 0.1, "qkv_bias": False},
}
# row: (library, device, precision, environment); torch's rows first, so that each of ours
# prints with its ratio as soon as it is measured.
ROWS = {
    # OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads sleep between ops instead of spinning;
    # on a machine shared with other work spinning threads wait for cores (18x slower
    # generation measured here at load 15).
    "torch-cpu": ("torch eager", "cpu", "fp32", {"OMP_WAIT_POLICY": "PASSIVE"}),
    "numpy-cpu": ("tinygrad_llm (NumPy)", "cpu", "fp32", {}),
    "torch-gpu": ("torch eager", "cuda", "fp32", {}),
    "cupy-gpu": ("tinygrad_llm (CuPy, fused kernels)", "cuda", "fp32", {"TINYGRAD_LLM_CUDA_KERNELS": "1"}),
    "cupy-gpu-arrays": ("tinygrad_llm (CuPy, array ops)", "cuda", "fp32", {"TINYGRAD_LLM_CUDA_KERNELS": "0"}),
    "torch-gpu-tf32": ("torch eager", "cuda", "tf32", {}),
    "cupy-gpu-tf32": ("tinygrad_llm (CuPy, fused kernels)", "cuda", "tf32",
                      {"TINYGRAD_LLM_CUDA_KERNELS": "1", "TINYGRAD_LLM_TF32": "1"}),
}
DENSE_PEAK_TFLOPS = {"H200": {"fp32": 67.0, "tf32": 495.0}, "H100": {"fp32": 67.0, "tf32": 495.0}}
LR, WEIGHT_DECAY, MAX_NORM = 4e-4, 0.1, 1.0
PROMPT_TOKENS, NEW_TOKENS = 16, 128


def batches(cfg, batch_size, context, count):
    import numpy as np
    rng = np.random.default_rng(0)
    return [tuple(rng.integers(0, cfg["vocab_size"], (batch_size, context)) for _ in range(2)) for _ in range(count)]


def ours(cfg, device):
    import tinygrad_llm as tl
    import tinygrad_llm.functional as F

    model = tl.GPTModel(cfg, seed=0).to(device)
    optimizer = tl.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(idx, targets):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(idx), targets)
        loss.backward()
        tl.optim.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        return loss.item()

    def generate(prompt, n):
        return tl.generate(model, prompt, n, context_size=cfg["context_length"])

    return step, generate


def pytorch(cfg, device):
    import torch
    from reference.gpt import GPTModel

    torch.manual_seed(0)
    model = GPTModel(cfg, fused=True).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    def step(idx, targets):
        optimizer.zero_grad(set_to_none=True)
        logits = model(torch.from_numpy(idx).to(device))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).to(device).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        return loss.item()

    @torch.no_grad()
    def generate(prompt, n):
        model.eval()
        tokens = torch.from_numpy(prompt).to(device)
        cache = [None] * len(model.trf_blocks)
        logits = forward_with_cache(model, tokens, 0, cache)
        for _ in range(n):
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
            logits = forward_with_cache(model, next_token, tokens.shape[1] - 1, cache)
        model.train()
        return tokens.cpu().numpy()

    return step, generate


def forward_with_cache(model, idx, start, cache):
    """The reference GPTModel's forward for positions [start, start + T), keys and values kept per
    layer: the prompt at start 0, then one token at a time (torch's is_causal aligns the mask
    at the top left, right for those two cases only)."""
    import torch

    B, T = idx.shape
    assert start == 0 or T == 1
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(start, start + T, device=idx.device))
    for layer, block in enumerate(model.trf_blocks):
        att, h = block.att, block.norm1(x)

        def heads(linear):
            return linear(h).view(B, T, att.num_heads, att.head_dim).transpose(1, 2)

        q, k, v = heads(att.W_query), heads(att.W_key), heads(att.W_value)
        if cache[layer] is not None:
            k, v = torch.cat([cache[layer][0], k], dim=2), torch.cat([cache[layer][1], v], dim=2)
        cache[layer] = (k, v)
        context = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        x = x + att.out_proj(context.transpose(1, 2).reshape(B, T, att.d_out))
        x = x + block.ff(block.norm2(x))
    return model.out_head(model.final_norm(x))


def child(row, config, batch_size, context, steps):
    """One row's measurements, as one line of JSON."""
    import numpy as np

    library, device, precision, _ = ROWS[row]
    cfg = CONFIGS[config]
    new_tokens = min(NEW_TOKENS, cfg["context_length"] - PROMPT_TOKENS)
    on_torch = library == "torch eager"
    if on_torch:
        import torch
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    step, generate = (pytorch if on_torch else ours)(cfg, device)
    warm_up = 2
    times = []
    for idx, targets in batches(cfg, batch_size, context, warm_up + steps):
        start = time.perf_counter()
        step(idx, targets)  # returns the loss as a float: the device has finished the step
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[warm_up:])
    prompt = np.random.default_rng(1).integers(0, cfg["vocab_size"], (1, PROMPT_TOKENS))
    generate(prompt, 8)  # warm-up
    start = time.perf_counter()
    generate(prompt, new_tokens)
    generation_seconds = time.perf_counter() - start
    result = {"tokens_per_s": batch_size * context / seconds, "step_s": seconds,
              "generation_tokens_per_s": new_tokens / generation_seconds}
    result.update(memory_and_peak(device, precision, on_torch))
    print(json.dumps(result))


def memory_and_peak(device, precision, on_torch):
    if device == "cpu":
        import numpy as np

        from tinygrad_llm import cpu
        a = np.ones((2048, 2048), np.float32)
        start = time.perf_counter()
        with cpu.blas_threads(cpu.get_num_threads()):  # tinygrad_llm keeps OpenBLAS at one thread beside its own
            for _ in range(3):
                a @ a
        return {"peak_mb": peak_rss_mb(), "peak_flops": 3 * 2 * 2048**3 / (time.perf_counter() - start),
                "peak_source": "measured float32 matmul"}
    import torch
    name = torch.cuda.get_device_name()
    known = next((peaks for key, peaks in DENSE_PEAK_TFLOPS.items() if key in name), None)
    if on_torch:
        memory = torch.cuda.max_memory_reserved() / 2**20
    else:
        from tinygrad_llm import backend
        memory = backend.module_for("cuda").get_default_memory_pool().total_bytes() / 2**20
    if known is not None:
        return {"peak_mb": memory, "peak_flops": known[precision] * 1e12, "peak_source": f"{name} dense peak"}
    a = torch.ones((8192, 8192), device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    return {"peak_mb": memory, "peak_flops": 3 * 2 * 8192**3 / (time.perf_counter() - start),
            "peak_source": f"{name}, measured matmul"}


def gpu_available():
    probe = ("import torch, cupy; assert torch.cuda.is_available() and cupy.cuda.runtime.getDeviceCount() > 0")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="default: every row this machine can run")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["124M", "355M"],
                        help="355M runs on the GPU rows only")
    parser.add_argument("--gpu-batch", type=int, default=16)
    parser.add_argument("--gpu-context", type=int, default=1024)
    parser.add_argument("--cpu-batch", type=int, default=2)
    parser.add_argument("--cpu-context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the tiny config, 2 steps, small batches")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row, config, batch_size, context, steps = args.child
        return child(row, config, int(batch_size), int(context), int(steps))
    if args.quick:
        args.configs, args.steps = ["tiny"], 2
        args.gpu_batch, args.gpu_context, args.cpu_batch, args.cpu_context = 4, 128, 2, 64
    has_gpu = gpu_available()
    rows = args.rows or [row for row, (_, device, _, _) in ROWS.items() if device == "cpu" or has_gpu]

    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPU cores; "
          f"load {os.getloadavg()[0]:.1f}; GPU rows: {'yes' if has_gpu else 'no (no CUDA GPU with CuPy and torch)'}")
    print("| model | step / row | device | precision | batch x context | tokens/s | MFU | peak MB | vs torch "
          "| generation tokens/s | vs torch |")
    print("|---|---|---|---|---|--:|--:|--:|--:|--:|--:|")
    for config in args.configs:
        results = {}
        for row in rows:
            library, device, precision, environment = ROWS[row]
            if config == "355M" and device == "cpu":
                continue  # minutes per step on a CPU
            batch_size, context = (args.gpu_batch, args.gpu_context) if device == "cuda" else \
                (args.cpu_batch, args.cpu_context)
            command = [sys.executable, os.path.abspath(__file__), "--child", row, config, str(batch_size),
                       str(context), str(args.steps)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **environment})
            if done.returncode != 0:
                print(f"| {config} | {library} | {device} | {precision} | failed: "
                      f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode} |")
                continue
            result = results[row] = json.loads(done.stdout.strip().splitlines()[-1])
            torch_row = {"cpu": "torch-cpu", "cuda": "torch-gpu"}[device] + ("-tf32" if precision == "tf32" else "")
            baseline = results.get(torch_row)
            flops = model_flops_per_token({**CONFIGS[config], "context_length": context})
            mfu = result["tokens_per_s"] * flops / result["peak_flops"]
            train_ratio = f"{result['tokens_per_s'] / baseline['tokens_per_s']:.2f}x" if baseline and row != torch_row \
                else ""
            gen_ratio = f"{result['generation_tokens_per_s'] / baseline['generation_tokens_per_s']:.2f}x" \
                if baseline and row != torch_row else ""
            print(f"| {config} | {library} | {device} | {precision} | {batch_size} x {context} "
                  f"| {result['tokens_per_s']:,.0f} | {100 * mfu:.1f}% ({result['peak_source']}) "
                  f"| {result['peak_mb']:,.0f} | {train_ratio} | {result['generation_tokens_per_s']:,.1f} | {gen_ratio} |",
                  flush=True)


if __name__ == "__main__":
    main()
