"""Every op of tests/op_table.py against torch autograd (float64 and float32) and finite differences.

Example counts are relative to the active hypothesis profile (100 examples by default):
`examples(25)` runs a quarter of the profile's max_examples, so a larger local profile
scales every test up and the CI profile keeps the suite fast.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinygrad_llm.functional as F
from tinygrad_llm import Tensor

from tests.op_table import OPS, compare_with_torch, gradcheck_case


def examples(percent):
    return settings(max_examples=max(1, settings.default.max_examples * percent // 100), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


ops = pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])


@ops
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@examples(50)
@given(data=st.data())
def test_op_matches_torch(op, dtype, data):
    compare_with_torch(op, data.draw(op.cases, label="case"), dtype)


# The device path: CuPy on a GPU, in CI the stand-in, which catches host/device mixing on
# the first example that reaches the code; fewer examples keep the GPU run short.
@ops
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@examples(20)
@given(data=st.data())
def test_op_matches_torch_on_cuda(op, dtype, data):
    compare_with_torch(op, data.draw(op.cases, label="case"), dtype, "cuda")


@ops
@examples(10)
@given(data=st.data())
def test_op_gradcheck(op, data):
    assert gradcheck_case(op, data.draw(op.finite_difference_cases(), label="case"))


# The table compares against torch with drawn values; the behaviours below must hold on
# every run, so they are pinned down by examples that always contain them.


def test_tied_maxima_share_the_gradient():
    x = Tensor(np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]]), requires_grad=True)
    x.max(axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])


def test_integer_index_with_repeats_adds_up_the_gradient():
    x = Tensor(np.arange(3.0), requires_grad=True)
    x[np.array([0, 2, 0, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 0.0, 1.0])


def test_embedding_gradient_sums_repeated_ids():
    weight = Tensor(np.zeros((4, 2)), requires_grad=True)
    F.embedding(np.array([[1, 3, 1], [1, 0, 3]]), weight).backward(np.ones((2, 3, 2)))
    np.testing.assert_array_equal(weight.grad, [[1, 1], [3, 3], [0, 0], [2, 2]])


def test_dropout_drops_a_fraction_p_and_scales_the_rest():
    p, n = 0.3, 200_000
    out = F.dropout(Tensor(np.ones(n)), p).numpy()
    kept = out != 0
    # The dropped fraction is binomial: 5 standard deviations is sqrt(p (1 - p) / n) * 5 = 0.005.
    assert abs(1 - kept.mean() - p) < 0.005
    np.testing.assert_allclose(out[kept], 1 / (1 - p))


def test_dropout_is_the_identity_in_eval_mode_and_at_p_zero():
    x = Tensor(np.ones(10), requires_grad=True)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x


def test_attention_dropout_changes_the_output():
    rng = np.random.default_rng(0)
    q, k, v = (Tensor(rng.standard_normal((1, 2, 6, 4))) for _ in range(3))
    plain = F.scaled_dot_product_attention(q, k, v).numpy()
    dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5).numpy()
    assert not np.allclose(plain, dropped)
