"""Chapter 8 on each device: DPO's loss and gradients, reward scores and a PPO step give the CPU's numbers."""
import numpy as np

import tinygrad_llm as tl
from tinygrad_llm import backend
from tinygrad_llm.finetune import ppo, preference

CFG = {"vocab_size": 61, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}


def batch(device):
    rng = np.random.default_rng(0)
    items = []
    for _ in range(3):
        prompt = rng.integers(0, 60, 4).tolist()
        items.append({"prompt": prompt, "chosen": prompt + rng.integers(0, 60, 5).tolist(),
                      "rejected": prompt + rng.integers(0, 60, 7).tolist()})
    return preference.custom_collate_fn(items, pad_token_id=60, device=device)


def on(device, seed=0):
    return tl.GPTModel(CFG, seed=seed).to(device=device)


def test_dpo_loss_and_gradients_on_each_device(device):
    expected_policy = on("cpu")
    expected = preference.compute_dpo_loss_batch(batch("cpu"), expected_policy, on("cpu", seed=1), beta=0.1)
    expected[0].backward()
    policy = on(device)
    out = preference.compute_dpo_loss_batch(batch(device), policy, preference.make_reference_model(on(device, 1)), 0.1)
    out[0].backward()
    # float32, the same formulas; a GPU's reductions round in another order.
    np.testing.assert_allclose([v.item() for v in out], [v.item() for v in expected], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(policy.named_parameters(), expected_policy.parameters()):
        assert p.grad is not None and backend.device_of(p.grad) == device
        np.testing.assert_allclose(backend.to_host(p.grad), q.grad, rtol=1e-4, atol=1e-6, err_msg=name)


def test_reward_scores_on_each_device(device):
    expected = preference.reward_scores(preference.make_reward_model(on("cpu"), seed=0), batch("cpu")["chosen"],
                                        batch("cpu")["chosen_mask"])
    scores = preference.reward_scores(preference.make_reward_model(on(device), seed=0), batch(device)["chosen"],
                                      batch(device)["chosen_mask"])
    np.testing.assert_allclose(scores.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_a_ppo_step_on_each_device(device):
    prompts = [np.array([11, 12, 13]), np.array([14, 15, 16])]

    def reward_fn(prompt_ids, response_ids):
        return np.array([np.isin(r, np.arange(10)).mean() for r in response_ids])

    histories = [ppo.train_ppo(on(d), reward_fn, prompts, num_steps=2, response_length=4, lr=1e-3, seed=0,
                               batch_size=2, progress=False) for d in ("cpu", device)]
    # Sampling draws from the same seeded generator on the host: the same responses, the same rewards.
    assert histories[0]["reward_mean"] == histories[1]["reward_mean"]
    np.testing.assert_allclose(histories[1]["policy_loss"], histories[0]["policy_loss"], rtol=1e-4, atol=1e-6)
