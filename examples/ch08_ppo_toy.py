"""PPO on a task with a known reward: a small GPT learns to say tokens from a chosen set.

The policy is a 2-layer GPT over a 61-token vocabulary; each prompt is 3 random tokens
from 10..60 and the reward of a 6-token response is the share of its tokens in 0..9 (a
random policy scores about 1/6). The KL coefficient adapts towards target_kl as in
lm-human-preferences, with a short horizon so the controller acts within the run.

    python examples/ch08_ppo_toy.py                 # 100 PPO steps, a few seconds on a CPU
    python examples/ch08_ppo_toy.py --plot ppo.png
"""
import argparse

import numpy as np

import tinygrad_llm as tl
from tinygrad_llm.finetune import ppo, preference

CFG = {"vocab_size": 61, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}
TARGET_IDS = np.arange(10)


def target_share(prompt_ids, response_ids):
    return np.array([np.isin(response, TARGET_IDS).mean() for response in response_ids])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--target-kl", type=float, default=3.0)
    parser.add_argument("--plot", help="write the reward and KL curves to this PNG")
    args = parser.parse_args()
    tl.manual_seed(0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 61, 3) for _ in range(64)]
    policy = tl.GPTModel(CFG, seed=4)
    history = ppo.train_ppo(policy, target_share, prompts, args.steps, response_length=6, lr=3e-3, kl_coef=0.05,
                            seed=0, batch_size=16, target_kl=args.target_kl, kl_horizon=400)
    for step in range(0, args.steps, 10):
        window = slice(step, step + 10)
        print(f"steps {step:3d}-{step + 9:3d}: mean reward {np.mean(history['reward_mean'][window]):.3f}, "
              f"KL {np.mean(history['kl'][window]):.2f}, KL coefficient {history['kl_coef'][step]:.3f}, "
              f"clip fraction {np.mean(history['clip_fraction'][window]):.3f}")
    if args.plot:
        steps = list(range(args.steps))
        preference.plot_panels(args.plot, "PPO step", [
            ("mean reward", {"reward": (steps, history["reward_mean"])}),
            ("KL to the reference", {"KL": (steps, history["kl"]), "target": (steps, [args.target_kl] * args.steps)})])
        print(f"Plot: {args.plot}")


if __name__ == "__main__":
    main()
