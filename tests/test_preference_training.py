"""DPO and reward-model training through the one loop, step for step against torch twins.

Both sides start from the same weights and see the same batches; after every optimizer
step the book's evaluation (losses and rewards over the first batches) must agree, and so
must the weights at the end. float32 throughout, as the book trains.
"""
import numpy as np
import pytest
import torch

import tinygrad_llm as tl
from reference import preference as ref_pref
from reference.gpt import GPTModel as TorchGPT
from reference.gpt import load_into_torch
from tinygrad_llm.finetune import preference

CFG = {"vocab_size": 61, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}
PAD = 60
STEPS = 10
# float32: ten AdamW steps of the same arithmetic in another rounding order; the losses
# sit near ln 2 and the rewards are differences of mean log-probabilities (~4) near 0.
RTOL, ATOL = 1e-4, 1e-5
# AdamW divides each gradient by its own running RMS: an element whose gradient is near the
# rounding noise moves by up to lr (3e-3 here) per step in a direction that noise can tip,
# so the weights get an absolute tolerance of a few hundredths of one step.
WEIGHT_ATOL = 1e-4


def compare_weights(ours, twin, zero_gradient=("att.W_key.bias",)):
    """Every parameter of the torch twin against ours, but those whose true gradient is 0: what
    either library computes for them is rounding noise (ours is often exactly 0), which AdamW
    scales up to steps of size lr. A key bias shifts all of a query's scores by one number,
    which softmax ignores."""
    for key, value in twin.state_dict().items():
        if not key.endswith(("att.mask", *zero_gradient)):
            np.testing.assert_allclose(ours.state_dict()[key], value.numpy(), rtol=RTOL, atol=WEIGHT_ATOL, err_msg=key)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The twins are tiny: torch's worker threads only wait for each other (and, on a busy
    machine, for a core), so torch runs on one thread here and on its default afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def preference_batches(n_batches, batch_size=2, seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        items = []
        for _ in range(batch_size):
            prompt = rng.integers(0, PAD, rng.integers(2, 8)).tolist()
            items.append({"prompt": prompt, "chosen": prompt + rng.integers(0, PAD, rng.integers(3, 10)).tolist(),
                          "rejected": prompt + rng.integers(0, PAD, rng.integers(3, 10)).tolist()})
        batches.append(preference.custom_collate_fn(items, pad_token_id=PAD))
    return batches


def as_torch(batch):
    return {key: torch.from_numpy(value) for key, value in batch.items() if key != "prompt"}


def torch_model(model, head=None):
    twin = TorchGPT(CFG)
    if head is not None:
        twin.out_head = torch.nn.Linear(CFG["emb_dim"], 1, bias=False)
    twin.load_state_dict({key: torch.from_numpy(value.copy()) for key, value in model.state_dict().items()},
                         strict=False)
    return twin


def test_dpo_training_matches_torch():
    policy = tl.GPTModel(CFG, seed=1)
    reference = preference.make_reference_model(policy)
    train_batches, val_batches = preference_batches(STEPS), preference_batches(2, seed=1)
    optimizer = tl.optim.AdamW(policy.parameters(), lr=5e-3, weight_decay=0.01)
    tracking = preference.train_model_dpo_simple(policy, reference, train_batches, val_batches, optimizer,
                                                 num_epochs=1, beta=0.1, eval_freq=1, eval_iter=1, progress=False)

    torch_policy = load_into_torch(TorchGPT(CFG), reference.state_dict())
    torch_reference = load_into_torch(TorchGPT(CFG), reference.state_dict()).eval().requires_grad_(False)
    torch_optimizer = torch.optim.AdamW(torch_policy.parameters(), lr=5e-3, weight_decay=0.01)
    expected = {key: [] for key in tracking}
    for batch in train_batches:
        torch_optimizer.zero_grad()
        ref_pref.compute_dpo_loss_batch(as_torch(batch), torch_policy, torch_reference, 0.1)[0].backward()
        torch_optimizer.step()
        torch_policy.eval()
        with torch.no_grad():
            for split, batches in (("train", train_batches[:1]), ("val", val_batches[:1])):
                results = np.mean([[value.item() for value in ref_pref.compute_dpo_loss_batch(
                    as_torch(b), torch_policy, torch_reference, 0.1)] for b in batches], axis=0)
                expected[f"{split}_losses"].append(results[0])
                expected[f"{split}_chosen_rewards"].append(results[1])
                expected[f"{split}_rejected_rewards"].append(results[2])
        torch_policy.train()
    expected["tokens_seen"] = list(np.cumsum([b["chosen"].size for b in train_batches]))

    assert len(tracking["train_losses"]) == STEPS
    for key in tracking:
        np.testing.assert_allclose(tracking[key], expected[key], rtol=RTOL, atol=ATOL, err_msg=key)
    # The policy moved (margins grew), the reference did not and holds no gradients.
    assert tracking["train_chosen_rewards"][-1] - tracking["train_rejected_rewards"][-1] > 0.1
    compare_weights(policy, torch_policy)
    for key, value in torch_reference.state_dict().items():
        if not key.endswith("att.mask"):
            np.testing.assert_array_equal(reference.state_dict()[key], value.numpy(), err_msg=key)
    assert all(p.grad is None and not p.requires_grad for p in reference.parameters())


def test_dpo_starts_at_ln2_when_policy_and_reference_are_the_same_model():
    policy = tl.GPTModel(CFG, seed=2)
    reference = preference.make_reference_model(policy)
    batches = preference_batches(3)
    results = preference.evaluate_dpo_loss_loader(policy, reference, batches, batches, beta=0.1, eval_iter=3)
    # The book's printout: float32's ln 2, 0.6931471824645996, and margins of exactly 0.
    assert results["train_loss"] == results["val_loss"] == float(np.float32(np.log(2)))
    assert results["train_chosen_reward"] == results["train_rejected_reward"] == 0.0


def test_the_reference_model_records_no_graph():
    policy = tl.GPTModel(CFG, seed=3)
    reference = preference.make_reference_model(policy)
    batch = preference_batches(1)[0]
    loss, _, _ = preference.compute_dpo_loss_batch(batch, policy, reference, beta=0.1)
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters())
    assert all(p.grad is None for p in reference.parameters())
    assert reference.out_head.weight is not policy.out_head.weight


def test_train_model_dpo_simple_refuses_beta_zero():
    policy = tl.GPTModel(CFG, seed=4)
    with pytest.raises(ValueError, match="beta must be > 0"):
        preference.train_model_dpo_simple(policy, policy, [], [], None, 1, beta=0.0, eval_freq=1, eval_iter=1)


def test_reward_model_training_matches_torch():
    tl.manual_seed(5)
    reward_model = preference.make_reward_model(tl.GPTModel(CFG, seed=5))
    twin = torch_model(reward_model, head=1)
    train_batches, val_batches = preference_batches(STEPS, seed=2), preference_batches(2, seed=3)
    optimizer = tl.optim.AdamW(reward_model.parameters(), lr=3e-3, weight_decay=0.01)
    history = preference.train_reward_model(reward_model, train_batches, val_batches, optimizer, num_epochs=1,
                                            eval_freq=1, eval_iter=1, progress=False)

    torch_optimizer = torch.optim.AdamW(twin.parameters(), lr=3e-3, weight_decay=0.01)
    evals = [record for record in history if record["event"] == "eval"]
    assert len(evals) == STEPS
    for batch, record in zip(train_batches, evals):
        torch_optimizer.zero_grad()
        ref_pref.reward_model_loss_batch(as_torch(batch), twin)[0].backward()
        torch_optimizer.step()
        with torch.no_grad():
            for split, batches in (("train", train_batches[:1]), ("val", val_batches[:1])):
                scored = [ref_pref.reward_model_loss_batch(as_torch(b), twin) for b in batches]
                margins = torch.cat([chosen - rejected for _, chosen, rejected in scored]).numpy()
                np.testing.assert_allclose(record[f"{split}_loss"], np.mean([loss.item() for loss, _, _ in scored]),
                                           rtol=RTOL, atol=ATOL)
                np.testing.assert_allclose(record[f"{split}_margin"], margins.mean(), rtol=RTOL, atol=ATOL)
                assert record[f"{split}_accuracy"] == np.mean(margins > 0)
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]
    assert history[-1]["event"] == "epoch" and 0.0 <= history[-1]["val_accuracy_full"] <= 1.0
    # The final LayerNorm's shift adds the same number to every score, which the pairwise loss ignores.
    compare_weights(reward_model, twin, zero_gradient=("att.W_key.bias", "final_norm.shift"))


def test_reward_scores_read_the_last_response_token():
    reward_model = preference.make_reward_model(tl.GPTModel(CFG, seed=6), seed=0)
    ids = np.array([[1, 2, 3, PAD, PAD], [4, 5, 6, 7, 8]])
    mask = np.array([[False, True, True, False, False], [False, False, True, True, True]])
    scores = preference.reward_scores(reward_model, ids, mask).numpy()
    full = reward_model(ids).numpy()[..., 0]
    np.testing.assert_array_equal(scores, [full[0, 2], full[1, 4]])
    with pytest.raises(ValueError, match="row 1 of the batch has no response token"):
        preference.reward_scores(reward_model, ids, np.array([[True] * 5, [False] * 5]))


def test_a_reward_model_checkpoint_round_trips(tmp_path):
    reward_model = preference.make_reward_model(tl.GPTModel(CFG, seed=7), seed=1)
    preference.save_reward_model(tmp_path / "reward.safetensors", reward_model)
    loaded = preference.load_reward_model(tmp_path / "reward.safetensors")
    ids = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(loaded(ids).numpy(), reward_model(ids).numpy())
    tl.save_checkpoint(tmp_path / "gpt.safetensors", tl.GPTModel(CFG, seed=7))
    with pytest.raises(ValueError, match="not a reward-model checkpoint"):
        preference.load_reward_model(tmp_path / "gpt.safetensors")


def test_dpo_trains_lora_adapters_alone():
    from tinygrad_llm.lora import lora_layers, replace_linear_with_lora

    policy = tl.GPTModel(CFG, seed=8)
    for p in policy.parameters():
        p.requires_grad = False
    replace_linear_with_lora(policy, rank=2, alpha=2)
    reference = preference.make_reference_model(policy)
    batch = preference_batches(1)[0]
    results = preference.evaluate_dpo_loss_loader(policy, reference, [batch], [batch], beta=0.1, eval_iter=1)
    assert results["train_loss"] == float(np.float32(np.log(2)))  # B = 0: the adapted model is the base model
    preference.compute_dpo_loss_batch(batch, policy, reference, beta=0.1)[0].backward()
    adapters = {id(p) for layer in lora_layers(policy).values() for p in layer.lora.parameters()}
    assert adapters and all((p.grad is not None) == (id(p) in adapters) for p in policy.parameters())
    assert all(p.grad is None for p in reference.parameters())
