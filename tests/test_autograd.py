"""The autograd engine's edge cases: extreme values, graph shapes and the rules of backward()."""
import numpy as np
import pytest
import torch

import tinygrad_llm.functional as F
from reference import ops as ref
from tinygrad_llm import Tensor, no_grad


def pair(array):
    """The same values as a tinygrad_llm leaf and a torch leaf, both requiring grad."""
    return Tensor(array, requires_grad=True), torch.tensor(array, requires_grad=True)


# ---- numerical stability -------------------------------------------------------------------


def softmax_family_against_torch(logits):
    """(loss, d loss / d logits) of cross_entropy + sum(softmax * log_softmax) over (6, 9)
    logits, ours and then torch's."""
    targets = np.array([0, 3, 8, 1, 1, 5])
    ours, theirs = pair(logits)
    loss = F.cross_entropy(ours, targets) + (F.softmax(ours) * F.log_softmax(ours)).sum()
    expected = (torch.nn.functional.cross_entropy(theirs, torch.tensor(targets))
                + (torch.softmax(theirs, -1) * torch.log_softmax(theirs, -1)).sum())
    loss.backward()
    expected.backward()
    return loss.item(), ours.grad, expected.item(), theirs.grad.numpy()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_and_cross_entropy_survive_logits_of_magnitude_1e4(dtype):
    # exp(1e4) overflows even float64: only subtracting the row maximum keeps these finite.
    logits = (np.random.default_rng(0).standard_normal((6, 9)) * 1e4).astype(dtype)
    loss, grad, expected_loss, expected_grad = softmax_family_against_torch(logits)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    # Losses of order 1e4 in float32 keep ~7 digits.
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)


# The softmax family shifts its inputs by 0, by one number or by each row's maximum,
# whichever the values allow (functional._exp_shifted); each regime must give torch's answer.
SHIFT_REGIMES = {
    "within +-64: no shift": lambda z: z,
    "all near 1000: one shift": lambda z: z + 1000.0,
    "spread over 300: row maxima": lambda z: z * 100.0,
    "some rows near -1000: row maxima": lambda z: z - 1000.0 * (np.arange(len(z)) % 2)[:, None],
}


@pytest.mark.parametrize("regime", SHIFT_REGIMES)
def test_softmax_family_equals_torch_whatever_shift_the_values_allow(regime):
    logits = SHIFT_REGIMES[regime](np.random.default_rng(1).standard_normal((6, 9)))
    loss, grad, expected_loss, expected_grad = softmax_family_against_torch(logits)
    # float64 with values up to 1000: log-probabilities keep ~13 digits.
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-11)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-9, atol=1e-12)


def attention_inputs(rng, regime):
    """q, k, v of shape (2, 3, 8, 4) whose scores q k^T / 2 fall in the given regime."""
    q, k, v = (rng.standard_normal((2, 3, 8, 4)) for _ in range(3))
    if regime == "one shift":
        q[..., 0] += 2000.0  # every score near 1000, within a few of each other
        k[..., 0], k[..., 1:] = 1.0, k[..., 1:] * 0.1
    elif regime == "row maxima":
        q *= 40.0
    return q, k, v


@pytest.mark.parametrize("regime", ["no shift", "one shift", "row maxima"])
def test_causal_attention_equals_torch_whatever_shift_the_scores_allow(regime):
    # The masked (later) scores take part in the range tests: each regime must still give
    # them exactly zero weight.
    rng = np.random.default_rng(2)
    ours, theirs = zip(*(pair(a) for a in attention_inputs(rng, regime)))
    out = F.scaled_dot_product_attention(*ours)
    expected = torch.nn.functional.scaled_dot_product_attention(*theirs, is_causal=True)
    upstream = rng.standard_normal(out.shape)
    out.backward(upstream)
    expected.backward(torch.tensor(upstream))
    # float64; scores near 1000 leave ~13 digits in the weights.
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=1e-10, atol=1e-10)
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine.grad, reference.grad.numpy(), rtol=1e-8, atol=1e-9)


def test_layer_norm_of_constant_rows_gives_the_shift_and_finite_gradients():
    # Zero variance: eps alone keeps 1/sqrt(var + eps) finite (316 for eps = 1e-5).
    x = np.array([[2.5] * 8, [-1.0] * 8, [0.1] * 8])
    scale, shift = np.linspace(0.5, 2.0, 8), np.linspace(-1.0, 1.0, 8)
    ours = [Tensor(a, requires_grad=True) for a in (x, scale, shift)]
    theirs = [torch.tensor(a, requires_grad=True) for a in (x, scale, shift)]
    upstream = np.random.default_rng(0).standard_normal(x.shape)
    out = F.layer_norm(*ours)
    out.backward(upstream)
    ref.layer_norm(*theirs).backward(torch.tensor(upstream))
    # 0.1 is not a binary fraction: its row's mean is off by an ulp, times 316.
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(shift, x.shape), atol=1e-12)
    for mine, expected in zip(ours, theirs):
        assert np.isfinite(mine.grad).all()
        np.testing.assert_allclose(mine.grad, expected.grad.numpy(), rtol=1e-10, atol=1e-10)


def test_cross_entropy_with_all_targets_but_one_ignored_is_that_targets_loss():
    logits = np.random.default_rng(0).standard_normal((2, 3, 5))
    targets = np.full((2, 3), -100)
    targets[1, 2] = 4
    ours, theirs = pair(logits)
    loss = F.cross_entropy(ours, targets)
    loss.backward()
    expected = torch.nn.functional.cross_entropy(theirs.reshape(6, 5), torch.tensor(targets).reshape(6))
    expected.backward()
    np.testing.assert_allclose(loss.item(), -torch.log_softmax(torch.tensor(logits[1, 2]), 0)[4].item(), rtol=1e-12)
    np.testing.assert_allclose(loss.item(), expected.item(), rtol=1e-12)
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-12, atol=1e-15)
    # Ignored rows get no gradient at all.
    assert np.count_nonzero(ours.grad.reshape(6, 5)[:5]) == 0


def test_cross_entropy_with_every_target_ignored_is_nan_with_zero_gradient_as_torch():
    ours, theirs = pair(np.ones((3, 4)))
    loss = F.cross_entropy(ours, np.full(3, -100))
    loss.backward()
    expected = torch.nn.functional.cross_entropy(theirs, torch.full((3,), -100))
    expected.backward()
    assert np.isnan(loss.item()) and np.isnan(expected.item())
    np.testing.assert_array_equal(ours.grad, theirs.grad.numpy())


# ---- graph shapes ---------------------------------------------------------------------------


def test_a_node_used_twice_accumulates_both_gradients():
    ours, theirs = pair(np.array([0.5, -2.0, 3.0]))
    for x in (ours, theirs):
        hidden = x * x  # used twice below: its gradient is the sum of both uses
        (hidden * hidden + hidden * 3.0 + x).sum().backward()
    # d/dx (x^4 + 3x^2 + x) = 4x^3 + 6x + 1
    np.testing.assert_allclose(ours.grad, 4 * ours.data**3 + 6 * ours.data + 1, rtol=1e-15)
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-15)


def test_a_leaf_used_twice_in_one_op_gets_both_gradients():
    x = Tensor(np.array([1.5, -2.0]), requires_grad=True)
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * x.data)


def test_a_chain_of_20000_ops_backpropagates_without_recursion():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(20_000):  # a recursive backward would pass Python's limit of 1000 frames
        y = y * 1.0001
    y.backward()
    np.testing.assert_allclose(x.grad, 1.0001**20_000, rtol=1e-10)


def test_broadcast_gradients_are_summed_back_to_each_input_shape():
    a = Tensor(np.ones((2, 1, 3)), requires_grad=True)
    b = Tensor(np.full((4, 1), 2.0), requires_grad=True)
    (a * b).sum().backward()
    assert a.grad.shape == (2, 1, 3) and b.grad.shape == (4, 1)
    np.testing.assert_array_equal(a.grad, np.full((2, 1, 3), 4 * 2.0))  # four rows of b, each 2
    np.testing.assert_array_equal(b.grad, np.full((4, 1), 2 * 3 * 1.0))  # six elements of a, each 1


# ---- the rules of backward() ------------------------------------------------------------------


def test_no_grad_records_no_graph_and_restores_recording_afterwards():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = F.gelu(x * 2.0).sum()
    assert not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    assert (x * 2.0).requires_grad


def test_no_grad_as_a_decorator():
    double = no_grad()(lambda t: t * 2.0)
    assert not double(Tensor(np.ones(2), requires_grad=True)).requires_grad


def test_integer_tensors_never_require_grad():
    with pytest.raises(TypeError, match="only float tensors can require grad"):
        Tensor(np.arange(3), requires_grad=True)
    ids = Tensor(np.array([0, 1, 1]))
    weight = Tensor(np.ones((2, 3)), requires_grad=True)
    F.embedding(ids, weight).sum().backward()
    assert not ids.requires_grad and ids.grad is None
    assert weight.grad is not None


def test_backward_on_a_non_scalar_needs_a_gradient():
    y = Tensor(np.ones((2, 3)), requires_grad=True) * 2.0
    with pytest.raises(RuntimeError, match=r"scalar output, got shape \(2, 3\)"):
        y.backward()


def test_backward_with_a_gradient_of_the_wrong_shape_names_both_shapes():
    y = Tensor(np.ones((2, 3)), requires_grad=True) * 2.0
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
        y.backward(np.ones((3, 2)))


def test_a_second_backward_through_a_freed_graph_says_to_retain_it():
    x = Tensor(np.ones(3), requires_grad=True)
    y = (x.exp() * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()


def test_retain_graph_lets_backward_run_twice_and_accumulate():
    x = Tensor(np.array([0.5, 1.0]), requires_grad=True)
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    once = x.grad.copy()
    y.backward(retain_graph=True)
    np.testing.assert_allclose(x.grad, 2 * once, rtol=1e-15)


def test_retain_graph_through_cross_entropy_whose_backward_reuses_its_cache():
    # The first backward turns the cached softmax into the gradient in place; the second
    # must not see that array again.
    logits = np.random.default_rng(0).standard_normal((4, 7))
    targets = np.array([1, 6, -100, 0])
    ours, theirs = pair(logits)
    loss = F.cross_entropy(ours, targets)
    expected = torch.nn.functional.cross_entropy(theirs, torch.tensor(targets))
    for _ in range(3):
        loss.backward(retain_graph=True)
        expected.backward(retain_graph=True)
        np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_a_leafs_grad_is_its_own_array():
    # a + b hands the same upstream array to both leaves; each must get its own copy.
    a, b = (Tensor(np.zeros(3), requires_grad=True) for _ in range(2))
    upstream = np.ones(3)
    (a + b).backward(upstream)
    a.grad *= 2.0
    np.testing.assert_array_equal(b.grad, np.ones(3))
    np.testing.assert_array_equal(upstream, np.ones(3))


def test_a_leafs_grad_from_a_broadcast_is_writable():
    # sum's backward broadcasts a scalar (a read-only view); the leaf gets a real array.
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    x.sum().backward()
    x.grad *= 0.5
    np.testing.assert_array_equal(x.grad, np.full((2, 3), 0.5))
