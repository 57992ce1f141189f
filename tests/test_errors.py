"""Bad input gets an error that names the problem, raised before NumPy fails somewhere inside."""
import re

import numpy as np
import pytest

import tinygrad_llm as tl
import tinygrad_llm.functional as F
from tinygrad_llm import Tensor


def floats(*shape):
    return Tensor(np.ones(shape), requires_grad=True)


@pytest.mark.parametrize("left, right", [((2, 3), (4, 5)), ((2, 3, 4), (5, 6)), ((3,), (2, 3))])
def test_matmul_shape_mismatch_names_both_shapes(left, right):
    with pytest.raises(ValueError, match=f"matmul.*{re.escape(str(left))}.*{re.escape(str(right))}"):
        floats(*left) @ floats(*right)


@pytest.mark.parametrize("bad_id", [7, 5, -1])
def test_embedding_id_out_of_range_names_the_id_and_the_table_size(bad_id):
    with pytest.raises(ValueError, match=rf"token id {bad_id} is out of range.*5 entries"):
        F.embedding(np.array([[0, bad_id, 2]]), floats(5, 3))


def test_embedding_of_float_ids_says_ids_must_be_integers():
    with pytest.raises(TypeError, match="token ids must be integers, got dtype float64"):
        F.embedding(np.array([0.0, 1.0]), floats(5, 3))


@pytest.mark.parametrize("name, call", [
    ("exp", lambda x: x.exp()), ("log", lambda x: x.log()), ("tanh", lambda x: x.tanh()),
    ("sqrt", lambda x: x.sqrt()), ("\\*\\*", lambda x: x ** 0.5), ("gelu", F.gelu),
    ("softmax", F.softmax), ("log_softmax", F.log_softmax),
])
def test_a_float_op_on_an_integer_tensor_names_the_op_and_the_dtype(name, call):
    with pytest.raises(TypeError, match=f"^{name} needs a float tensor, got int64"):
        call(Tensor(np.arange(4)))


def test_linear_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"linear: input of shape \(2, 3\).*weight of shape \(4, 5\)"):
        F.linear(floats(2, 3), floats(4, 5))


@pytest.mark.parametrize("bad_target", [3, -1])
def test_cross_entropy_target_out_of_range_names_it_and_the_vocabulary(bad_target):
    with pytest.raises(ValueError, match=rf"target {bad_target} is out of range.*3 entries"):
        F.cross_entropy(floats(2, 3), np.array([0, bad_target]))


def test_cross_entropy_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"targets of shape \(2, 4\).*logits of shape \(2, 3, 5\)"):
        F.cross_entropy(floats(2, 3, 5), np.zeros((2, 4), np.int64))


def test_cross_entropy_of_float_targets_says_they_must_be_integers():
    with pytest.raises(TypeError, match="targets must be integers"):
        F.cross_entropy(floats(2, 3), np.array([0.0, 1.0]))


@pytest.mark.parametrize("p", [1.0, -0.1])
def test_dropout_probability_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match=rf"dropout probability must be in \[0, 1\), got {p}"):
        F.dropout(floats(3), p)
    with pytest.raises(ValueError, match="dropout probability"):
        tl.nn.Dropout(p)


def test_unsupported_float_dtype_is_refused():
    with pytest.raises(TypeError, match="unsupported float dtype float16"):
        Tensor(np.ones(3, np.float16))


def test_split_into_unequal_pieces_says_so():
    with pytest.raises(ValueError, match="size 3 does not divide into 2 equal pieces"):
        tl.split(floats(3), 2)


def test_a_non_scalar_exponent_is_refused():
    with pytest.raises(TypeError, match="scalar exponent"):
        floats(3) ** floats(3)
