"""The losses of chapter 8 (DPO, the reward model, PPO) and GAE against their torch twins.

Every loss and the gradient of every input that takes one is compared with reference/
under hypothesis, in float64 and float32, with masks that may select nothing in a row.
"""
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp

from reference import ppo as ref_ppo
from reference import preference as ref_pref
from tinygrad_llm import Tensor
from tinygrad_llm.finetune import ppo, preference

# (rtol, atol): float64 evaluates the same formulas in another rounding order (a log-sum-exp
# over at most 6 terms, sums over at most 6 tokens); float32 the same at eps 1.2e-7,
# amplified by exp in the log-softmax and the PPO ratio (|logp - old| <= 2, so ratio <= e^2).
TOLERANCE = {np.float64: (1e-10, 1e-12), np.float32: (1e-4, 1e-5)}
DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32])
FEW = settings(max_examples=25, deadline=None)


def floats(shape, low=-3.0, high=3.0):
    return hnp.arrays(np.float64, shape, elements=st.floats(low, high, allow_subnormal=False))


@st.composite
def masks(draw, shape):
    """Boolean masks, half of them with a first row that selects nothing."""
    mask = draw(hnp.arrays(bool, shape))
    if draw(st.booleans()):
        mask[0] = False
    return mask


def prefix_masks(draw, batch, tokens):
    """1 on each row's first n tokens (its response up to the end token), n from 0 to tokens."""
    lengths = draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, tokens)))
    return (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.float64)


def leaves(arrays, dtype):
    ours = [Tensor(a.astype(dtype), requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a.astype(dtype), requires_grad=True) for a in arrays]
    return ours, theirs


def assert_same(ours_out, theirs_out, ours_in, theirs_in, dtype):
    """Outputs equal; then the gradient of sum(out * g) with a random g, for every input."""
    rtol, atol = TOLERANCE[dtype]
    ours_out = ours_out if isinstance(ours_out, (tuple, list)) else [ours_out]
    theirs_out = theirs_out if isinstance(theirs_out, (tuple, list)) else [theirs_out]
    for mine, expected in zip(ours_out, theirs_out):
        assert mine.dtype == dtype
        np.testing.assert_allclose(mine.numpy(), expected.detach().numpy(), rtol=rtol, atol=atol)
    upstream = np.random.default_rng(0).standard_normal(ours_out[0].shape).astype(dtype)
    ours_out[0].backward(upstream)
    theirs_out[0].backward(torch.from_numpy(upstream))
    for mine, expected in zip(ours_in, theirs_in):
        expected_grad = np.zeros(mine.shape, dtype) if expected.grad is None else expected.grad.numpy()
        np.testing.assert_allclose(mine.grad, expected_grad, rtol=rtol, atol=atol)


# ---- DPO and the reward model ----------------------------------------------------------------


@st.composite
def logprob_cases(draw):
    batch, tokens, vocab = draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(2, 6))
    logits = draw(floats((batch, tokens, vocab), -10.0, 10.0))
    labels = draw(hnp.arrays(np.int64, (batch, tokens), elements=st.integers(0, vocab - 1)))
    mask = draw(st.none() | masks((batch, tokens)))
    return logits, labels, mask, draw(st.sampled_from(["mean", "sum"]))


@DTYPES
@FEW
@given(case=logprob_cases())
def test_compute_logprobs_matches_the_book(case, dtype):
    logits, labels, mask, reduction = case
    (ours,), (theirs,) = leaves([logits], dtype)
    out = preference.compute_logprobs(ours, labels, mask, reduction=reduction)
    expected = ref_pref.compute_logprobs(theirs, torch.tensor(labels), None if mask is None else torch.tensor(mask),
                                         reduction=reduction)
    assert out.shape == (len(labels),)
    assert_same(out, expected, [ours], [theirs], dtype)


def test_a_row_that_selects_nothing_gives_zero_and_no_gradient():
    logits = Tensor(np.random.default_rng(0).standard_normal((2, 4, 5)), requires_grad=True)
    mask = np.array([[False] * 4, [False, True, True, False]])
    out = preference.compute_logprobs(logits, np.ones((2, 4), np.int64), mask)
    assert out.numpy()[0] == 0.0 and np.isfinite(out.numpy()).all()
    out.sum().backward()
    assert not logits.grad[0].any() and logits.grad[1].any()


def test_unselected_labels_may_be_any_value():
    # Padding marked -100 (as instruction targets are) at unselected positions is no error.
    logits = Tensor(np.zeros((1, 4, 5)))
    labels = np.array([[1, 2, -100, -100]])
    out = preference.compute_logprobs(logits, labels, np.array([[False, True, False, False]]))
    np.testing.assert_allclose(out.numpy(), [np.log(1 / 5)])


@FEW
@given(data=st.data(), reduction=st.sampled_from(["mean", "sum"]))
def test_a_batchs_logprobs_from_the_selected_positions_alone_equal_those_from_all_logits(data, reduction):
    # compute_dpo_loss_batch runs the head only where a selected label is predicted; the
    # book's way runs it everywhere and masks. float64: the same sums in another order.
    import tinygrad_llm as tl

    cfg = {"vocab_size": 37, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0}
    batch, tokens = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 8))
    labels = data.draw(hnp.arrays(np.int64, (batch, tokens), elements=st.integers(0, 36)))
    mask = data.draw(masks((batch, tokens)))
    model = tl.GPTModel(cfg, dtype="float64", seed=0)
    picked = preference._sequence_logprobs(model, labels, mask, reduction)
    picked.sum().backward()
    picked_grads = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    everywhere = preference.compute_logprobs(model(labels), labels, mask, reduction)
    everywhere.sum().backward()
    np.testing.assert_allclose(picked.numpy(), everywhere.numpy(), rtol=1e-12, atol=1e-12)
    for p, grad in zip(model.parameters(), picked_grads):
        np.testing.assert_allclose(grad, p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rejected_tokens", [5, 7])
def test_a_pair_in_one_pass_gives_each_sides_logprobs(rejected_tokens):
    # chosen and rejected of one length go through the model as one batch of 2B rows; of
    # two lengths, one after the other. Either way each side's numbers are its own.
    import tinygrad_llm as tl

    cfg = {"vocab_size": 37, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0}
    model = tl.GPTModel(cfg, dtype="float64", seed=0)
    rng = np.random.default_rng(1)
    batch = {"chosen": rng.integers(0, 37, (3, 5)), "rejected": rng.integers(0, 37, (3, rejected_tokens))}
    batch.update({f"{key}_mask": rng.random(batch[key].shape) < 0.6 for key in ("chosen", "rejected")})
    chosen, rejected = preference._pair_logprobs(model, batch, "mean")
    for key, got in (("chosen", chosen), ("rejected", rejected)):
        expected = preference.compute_logprobs(model(batch[key]), batch[key], batch[f"{key}_mask"])
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-12, atol=1e-12)


@st.composite
def dpo_cases(draw):
    batch = draw(st.integers(1, 4))
    return [draw(floats((batch,), -5.0, 0.0)) for _ in range(4)], draw(st.floats(0.01, 2.0))


@DTYPES
@FEW
@given(case=dpo_cases())
def test_compute_dpo_loss_matches_the_book(case, dtype):
    (policy_chosen, policy_rejected, reference_chosen, reference_rejected), beta = case
    ours, theirs = leaves([policy_chosen, policy_rejected], dtype)
    out = preference.compute_dpo_loss(*ours, reference_chosen.astype(dtype), reference_rejected.astype(dtype), beta)
    expected = ref_pref.compute_dpo_loss(*theirs, torch.tensor(reference_chosen.astype(dtype)),
                                         torch.tensor(reference_rejected.astype(dtype)), beta)
    assert not out[1].requires_grad and not out[2].requires_grad
    assert_same(out, expected, ours, theirs, dtype)


def test_dpo_loss_is_ln2_when_policy_and_reference_agree():
    logprobs = np.array([-1.5, -0.25, -3.0])
    loss, chosen, rejected = preference.compute_dpo_loss(Tensor(logprobs), Tensor(logprobs - 1), logprobs, logprobs - 1)
    assert loss.item() == np.log(2) and chosen.item() == 0.0 and rejected.item() == 0.0


@pytest.mark.parametrize("beta", [0.0, -0.1])
def test_beta_must_be_positive(beta):
    x = Tensor(np.zeros(2))
    with pytest.raises(ValueError, match="beta must be > 0"):
        preference.compute_dpo_loss(x, x, x, x, beta=beta)


@DTYPES
@FEW
@given(rewards=st.integers(1, 5).flatmap(lambda n: st.tuples(floats((n,), -30.0, 30.0), floats((n,), -30.0, 30.0))))
def test_reward_model_loss_matches_torch(rewards, dtype):
    ours, theirs = leaves(list(rewards), dtype)
    assert_same(preference.reward_model_loss(*ours), ref_pref.reward_model_loss(*theirs), ours, theirs, dtype)


def test_reward_model_loss_is_stable_for_large_margins():
    # log(sigmoid(-100)) underflows to log(0) when computed as written; the fused op keeps -100.
    loss = preference.reward_model_loss(Tensor(np.array([-50.0], np.float32), requires_grad=True),
                                        Tensor(np.array([50.0], np.float32)))
    assert loss.item() == pytest.approx(100.0)


# ---- PPO ---------------------------------------------------------------------------------------


@st.composite
def ppo_cases(draw):
    batch, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    current, old, advantages = (draw(floats((batch, tokens), -2.0, 2.0)) for _ in range(3))
    return current, old, advantages, prefix_masks(draw, batch, tokens), draw(st.sampled_from([0.1, 0.2, 0.5]))


@DTYPES
@FEW
@given(case=ppo_cases())
def test_ppo_policy_loss_matches_torch(case, dtype):
    logprobs, old_logprobs, advantages, mask, clip_range = case
    (ours,), (theirs,) = leaves([logprobs], dtype)
    out = ppo.ppo_policy_loss(ours, old_logprobs.astype(dtype), advantages.astype(dtype), mask, clip_range)
    expected = ref_ppo.ppo_policy_loss(theirs, *(torch.tensor(a.astype(dtype)) for a in (old_logprobs, advantages, mask)),
                                       clip_range)
    assert_same(out, expected, [ours], [theirs], dtype)


@DTYPES
@FEW
@given(case=ppo_cases())
def test_ppo_value_loss_matches_torch(case, dtype):
    values, old_values, returns, mask, clip_range = case
    (ours,), (theirs,) = leaves([values], dtype)
    out = ppo.ppo_value_loss(ours, old_values.astype(dtype), returns.astype(dtype), mask, clip_range)
    expected = ref_ppo.ppo_value_loss(theirs, *(torch.tensor(a.astype(dtype)) for a in (old_values, returns, mask)),
                                      clip_range)
    assert_same(out, expected, [ours], [theirs], dtype)


def test_ppo_losses_clip():
    # ratio e^1 > 1.2 with a positive advantage: the clipped term is larger and has no gradient.
    logprobs = Tensor(np.array([[1.0]]), requires_grad=True)
    loss = ppo.ppo_policy_loss(logprobs, np.zeros((1, 1)), np.ones((1, 1)), np.ones((1, 1)))
    loss.backward()
    assert loss.item() == pytest.approx(-1.2) and logprobs.grad[0, 0] == 0.0


@st.composite
def gae_cases(draw):
    batch, tokens = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    return (draw(floats((batch, tokens))), draw(floats((batch, tokens))), prefix_masks(draw, batch, tokens),
            draw(st.sampled_from([1.0, 0.99])), draw(st.sampled_from([0.95, 1.0, 0.0])))


@FEW
@given(case=gae_cases())
def test_compute_gae_matches_a_plain_loop(case):
    rewards, values, mask, gamma, lam = case
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = ref_ppo.compute_gae(rewards.tolist(), values.tolist(), mask.tolist(),
                                                                gamma, lam)
    np.testing.assert_allclose(advantages, expected_advantages, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-12, atol=1e-12)


def test_compute_gae_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        ppo.compute_gae(np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3)))
