"""PPO: one update on fixed rollouts against a torch twin, the rollouts themselves, learning a toy task, bad rewards."""
import numpy as np
import pytest
import torch

import tinygrad_llm as tl
from reference import ppo as ref_ppo
from reference.gpt import GPTModel as TorchGPT
from tinygrad_llm.finetune import ppo

CFG = {"vocab_size": 61, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}
TARGET_IDS = np.arange(10)  # the toy task: say tokens 0..9 (a sixth of the vocabulary)


def target_fraction(prompt_ids, response_ids):
    return np.array([np.isin(response, TARGET_IDS).mean() for response in response_ids])


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The twins are tiny: torch's worker threads only wait for each other, so torch runs on one thread here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompts(n, seed=0, lengths=(3,)):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, 61, lengths[i % len(lengths)]) for i in range(n)]


def torch_twin(model, scalar_head=False):
    twin = TorchGPT(CFG)
    if scalar_head:
        twin.out_head = torch.nn.Linear(CFG["emb_dim"], 1)
    missing, unexpected = twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()},
                                               strict=False)
    assert not unexpected and all(key.endswith("att.mask") for key in missing)
    return twin


def test_one_ppo_update_matches_torch():
    policy = tl.GPTModel(CFG, seed=0)
    value_model = ppo.make_value_model(policy)
    reference = tl.GPTModel(CFG, seed=1)  # another model, so the KL penalty is not zero
    # Two prompt lengths: two groups, each its own forward, one masked mean over the batch.
    rollouts = ppo.make_rollouts(policy, value_model, reference, target_fraction, prompts(10, lengths=(3, 5)),
                                 response_length=8, kl_coef=0.2, eos_id=7, seed=0)
    assert len(rollouts["groups"]) == 2 and rollouts["mask"].min() == 0.0  # some response ended early
    torch_policy, torch_value = torch_twin(policy), torch_twin(value_model, scalar_head=True)

    optimizer = tl.optim.AdamW([*policy.parameters(), *value_model.parameters()], lr=3e-3, weight_decay=0.0)
    stats = ppo.ppo_update(policy, value_model, optimizer, rollouts, ppo_epochs=4, grad_clip=0.5)
    torch_rollouts = {key: torch.tensor(value, dtype=torch.float32) for key, value in rollouts.items()
                      if key in ("mask", "logprobs", "values", "advantages", "returns")}
    torch_rollouts["groups"] = [(torch.from_numpy(seq), p) for seq, p in rollouts["groups"]]
    torch_optimizer = torch.optim.AdamW([*torch_policy.parameters(), *torch_value.parameters()], lr=3e-3,
                                        weight_decay=0.0)
    expected = ref_ppo.ppo_update(torch_policy, torch_value, torch_optimizer, torch_rollouts, ppo_epochs=4,
                                  grad_clip=0.5)

    # float32: four AdamW steps of the same arithmetic in another rounding order.
    np.testing.assert_allclose([[s["policy_loss"], s["value_loss"]] for s in stats], expected, rtol=1e-4, atol=1e-6)
    assert stats[-1]["policy_loss"] < stats[0]["policy_loss"]
    # A key bias's true gradient is 0 (softmax ignores a shift shared by a query's scores):
    # both libraries' rounding noise, scaled up by AdamW, is all that moves it.
    for ours, theirs in ((policy, torch_policy), (value_model, torch_value)):
        for key, value in theirs.state_dict().items():
            if not key.endswith(("att.mask", "att.W_key.bias")):
                np.testing.assert_allclose(ours.state_dict()[key], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)


def test_rollouts_start_with_zero_values_and_zero_kl():
    policy = tl.GPTModel(CFG, seed=2)
    value_model = ppo.make_value_model(policy)
    reference = ppo.make_reference_model(policy)
    rollouts = ppo.make_rollouts(policy, value_model, reference, target_fraction, prompts(4), 6, 0.2, seed=1, lam=1.0)
    assert not rollouts["values"].any() and not rollouts["kl"].any()
    # With values 0, gamma = lambda = 1 and no KL, every token's return is its row's score.
    np.testing.assert_allclose(rollouts["returns"], rollouts["scores"][:, None] * rollouts["mask"])


def test_responses_stop_at_eos_and_the_mask_keeps_it():
    policy = tl.GPTModel(CFG, seed=3)
    responses, mask = ppo.sample_responses(policy, np.array([[11, 12, 13]] * 8), 12, eos_id=7, seed=0)
    for response, row in zip(responses, mask):
        hits = np.flatnonzero(response == 7)
        length = hits[0] + 1 if hits.size else len(response)
        assert row.tolist() == [1.0] * length + [0.0] * (len(response) - length)
        assert (response[length:] == 7).all()


def test_ppo_learns_a_toy_reward():
    tl.manual_seed(0)
    policy = tl.GPTModel(CFG, seed=4)
    history = ppo.train_ppo(policy, target_fraction, prompts(32), num_steps=30, response_length=6, lr=3e-3,
                            kl_coef=0.05, seed=0, batch_size=16, progress=False)
    assert set(history) >= {"reward_mean", "kl", "clip_fraction"} and len(history["reward_mean"]) == 30
    assert history["kl"][0] == 0.0  # the policy starts as its own reference
    first, last = np.mean(history["reward_mean"][:5]), np.mean(history["reward_mean"][-5:])
    assert last > first + 0.2, (first, last)


@pytest.mark.parametrize("reward_fn, message", [
    (lambda prompt_ids, response_ids: np.zeros((len(response_ids), 2)), r"shape \(4, 2\); expected .* \(4,\)"),
    (lambda prompt_ids, response_ids: np.zeros(3), r"shape \(3,\)"),
    (lambda prompt_ids, response_ids: np.array([0.0, np.nan, 0.0, 0.0]), "returned nan for response 1"),
])
def test_a_bad_reward_is_refused(reward_fn, message):
    policy = tl.GPTModel(CFG, seed=5)
    with pytest.raises(ValueError, match=message):
        ppo.train_ppo(policy, reward_fn, prompts(4), num_steps=1, response_length=3, batch_size=4, progress=False)


def test_prompts_that_leave_no_room_for_the_response_are_refused():
    with pytest.raises(ValueError, match="prompt 0 .* exceed the context length 32"):
        ppo.train_ppo(tl.GPTModel(CFG, seed=6), target_fraction, [np.arange(30)], num_steps=1, response_length=5)


def test_a_resumed_run_is_the_uninterrupted_run(tmp_path):
    options = dict(num_steps=4, response_length=4, lr=3e-3, seed=0, batch_size=4, progress=False)
    straight = tl.GPTModel(CFG, seed=7)
    expected = ppo.train_ppo(straight, target_fraction, prompts(8), **options)
    path = tmp_path / "ppo.safetensors"
    ppo.train_ppo(tl.GPTModel(CFG, seed=7), target_fraction, prompts(8), **{**options, "num_steps": 2},
                  checkpoint_path=path)
    assert (tmp_path / "ppo.value.safetensors").exists()
    resumed = tl.GPTModel(CFG, seed=7)  # the policy as it started: the reference is a copy of it
    history = ppo.train_ppo(resumed, target_fraction, prompts(8), **options, checkpoint_path=path, resume=True)
    assert history == expected
    for (name, a), b in zip(resumed.named_parameters(), straight.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
