"""One DPO step at GPT-2 124M shapes, tinygrad_llm against PyTorch eager.

A step is what train_model_dpo_simple runs per batch: the policy's forward and backward on
the chosen and the rejected responses (tinygrad_llm runs the two as one batch of 2B rows),
the frozen reference model's forward on both without a graph, the DPO loss, and an AdamW
update (the book's lr 5e-6, weight decay 0.01). The
batches are the book's: 8 entries of instruction-data-with-preference, collated with the
prompt masked (about 8 x 80 tokens each for chosen and rejected). Both sides start from the
same random weights. PyTorch runs the reference/ model on its fastest eager path
(scaled_dot_product_attention, native LayerNorm and GELU, the fused AdamW) with the book's
compute_dpo_loss_batch (log_softmax over the vocabulary, then a gather). The two alternate
step by step in one process; the medians are reported.

    python benchmarks/dpo_step.py               # 5 timed steps after 2 warm-up steps
    python benchmarks/dpo_step.py --steps 3 --batch-size 4
"""
import argparse
import os
import statistics
import sys
import time

CFG = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
       "drop_rate": 0.0, "qkv_bias": True}
LR, WEIGHT_DECAY, BETA = 5e-6, 0.01, 0.1
WARM_UP = 2


def book_batches(batch_size, count):
    from tinygrad_llm.finetune import preference
    from tinygrad_llm.finetune.instruct import split_instruction_data
    from tinygrad_llm.tokenizers import get_gpt2_tokenizer

    train_data = split_instruction_data(preference.load_preference_data(allow_identical=True))[0]
    dataset = preference.PreferenceDataset(train_data[:batch_size * count], get_gpt2_tokenizer(), allow_identical=True)
    return [preference.custom_collate_fn([dataset[i] for i in range(b * batch_size, (b + 1) * batch_size)],
                                         allowed_max_length=1024) for b in range(count)]


def ours():
    import tinygrad_llm as tl
    from tinygrad_llm.finetune import preference

    policy = tl.GPTModel(CFG, seed=0)
    reference = preference.make_reference_model(policy)
    optimizer = tl.optim.AdamW(policy.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(batch):
        optimizer.zero_grad()
        loss = preference.compute_dpo_loss_batch(batch, policy, reference, BETA)[0]
        loss.backward()
        optimizer.step()
        return loss.item()

    return step, policy


def pytorch(state_dict):
    import torch

    from reference import preference as ref_pref
    from reference.gpt import GPTModel, load_into_torch

    policy = load_into_torch(GPTModel(CFG, fused=True), state_dict)
    reference = load_into_torch(GPTModel(CFG, fused=True), state_dict).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    def step(batch):
        batch = {key: torch.from_numpy(value) for key, value in batch.items() if key != "prompt"}
        optimizer.zero_grad(set_to_none=True)
        loss = ref_pref.compute_dpo_loss_batch(batch, policy, reference, BETA)[0]
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per library (median reported)")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per batch (the book: 8)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for reference/
    import torch

    import tinygrad_llm.cpu as tl_cpu

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    batches = book_batches(args.batch_size, WARM_UP + args.steps)
    ours_step, policy = ours()
    torch_step = pytorch(policy.state_dict())
    times, losses = {"ours": [], "torch": []}, {"ours": [], "torch": []}
    for i, batch in enumerate(batches):
        for name, step in (("ours", ours_step), ("torch", torch_step)):
            start = time.perf_counter()
            losses[name].append(step(batch))
            if i >= WARM_UP:
                times[name].append(time.perf_counter() - start)
    shapes = ", ".join(f"{b['chosen'].shape[1]}" for b in batches)
    print(f"DPO step, GPT-2 124M (qkv_bias, no dropout), batch {args.batch_size} pairs, sequence lengths {shapes}; "
          f"threads: tinygrad_llm {tl_cpu.get_num_threads()}, torch {torch.get_num_threads()}; "
          f"median of {args.steps} steps after {WARM_UP} warm-up steps")
    for name in ("ours", "torch"):
        print(f"{name:6} {statistics.median(times[name]):7.3f} s/step  (all: "
              f"{', '.join(f'{t:.2f}' for t in times[name])})")
    print(f"ratio torch time / ours: {statistics.median(times['torch']) / statistics.median(times['ours']):.2f}")
    print(f"largest loss difference over the steps: "
          f"{max(abs(a - b) for a, b in zip(losses['ours'], losses['torch'])):.2e}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
