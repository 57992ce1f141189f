"""Freezing as in torch: requires_grad=False means no .grad, no update, no graph, no wasted matmul."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tinygrad_llm as tl
import tinygrad_llm.functional as F
from tinygrad_llm import Tensor, cpu
from tinygrad_llm.tensor import _topological_order

CFG = {"vocab_size": 50, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 3,
       "drop_rate": 0.0, "qkv_bias": True}
IDS = np.random.default_rng(0).integers(0, 50, (2, 8))


def classifier(trainable):
    """The book's chapter 6 surgery: freeze everything, a new 2-class head, unfreeze `trainable`."""
    model = tl.GPTModel(CFG, dtype="float64", seed=1)
    for p in model.parameters():
        p.requires_grad = False
    model.out_head = tl.nn.Linear(CFG["emb_dim"], 2, dtype="float64", rng=np.random.default_rng(2))
    for module in trainable(model):
        for p in module.parameters():
            p.requires_grad = True
    return model


def last_block(model):
    return [model.trf_blocks[-1], model.final_norm]


def head_only(model):
    return []


def classification_loss(model):
    return F.cross_entropy(model(IDS)[:, -1, :], np.array([0, 1]))


def test_frozen_parameters_get_no_grad_and_no_update_while_the_rest_trains():
    model = classifier(last_block)
    frozen = {name: p.numpy().copy() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = {name: p.numpy().copy() for name, p in model.named_parameters() if p.requires_grad}
    assert "tok_emb.weight" in frozen and "trf_blocks.0.att.W_query.weight" in frozen
    assert "trf_blocks.2.att.W_query.weight" in trainable and "final_norm.scale" in trainable
    optimizer = tl.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # the book's call after freezing
    for _ in range(3):
        optimizer.zero_grad()
        classification_loss(model).backward()
        for name, p in model.named_parameters():
            assert (p.grad is None) == (name in frozen), name
        optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:  # no weight decay either: torch's AdamW skips a parameter without .grad
            np.testing.assert_array_equal(p.numpy(), frozen[name], err_msg=name)
        else:
            assert not np.array_equal(p.numpy(), trainable[name]), name
    assert len(optimizer.state) == len(trainable)


def ops_in_graph(loss):
    return [node._op for node in _topological_order(loss) if node._backward is not None]


@pytest.mark.parametrize("trainable, linears, layer_norms", [
    (last_block, 6 + 1, 2 + 1),  # the last block's q, k, v, out_proj and two FFN layers, the head
    (head_only, 1, 0),
])
def test_the_frozen_front_records_no_graph(trainable, linears, layer_norms):
    ops = ops_in_graph(classification_loss(classifier(trainable)))
    assert ops.count("linear") == linears and ops.count("layer_norm") == layer_norms
    assert "embedding" not in ops and ops.count("scaled_dot_product_attention") == (linears > 1)
    # every block trainable: the whole model is in the graph, every parameter a leaf of it
    model = classifier(lambda model: [model])
    loss = classification_loss(model)
    assert ops_in_graph(loss).count("linear") == 6 * CFG["n_layers"] + 1
    leaves = {id(node) for node in _topological_order(loss) if node._backward is None}
    assert all(id(p) in leaves for p in model.parameters())


def test_no_matmul_for_a_gradient_nobody_needs(monkeypatch):
    # Head only: its input comes from the frozen model, so the backward is dW alone, no dx.
    model = classifier(head_only)
    loss = classification_loss(model)
    products = []
    matmuls = cpu.matmuls
    monkeypatch.setattr(cpu, "matmuls", lambda pairs: products.append([(a.shape, b.shape) for a, b in pairs])
                        or matmuls(pairs))
    loss.backward()
    N, C = IDS.size, CFG["emb_dim"]  # the head runs on every position (the loss reads the last)
    assert products == [[((2, N), (N, C))]]  # dW = dout^T x; no dx = dout W
    assert model.out_head.weight.grad.shape == (2, C) and model.out_head.bias.grad.shape == (2,)


@given(needs=st.tuples(st.booleans(), st.booleans(), st.booleans()), bias=st.booleans())
def test_linear_and_layer_norm_backward_skip_exactly_the_gradients_not_needed(needs, bias):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)
    needs = needs if bias else needs[:2]
    out, cache = F.linear_forward(x, w, b if bias else None)
    dout = rng.standard_normal(out.shape)
    full, skipped = F.linear_backward(dout, cache), F.linear_backward(dout, cache, needs)
    for need, g_full, g in zip(needs, full, skipped):
        assert g is None if not need else np.array_equal(g, g_full)

    scale, shift = rng.standard_normal(4), rng.standard_normal(4)
    out, cache = F.layer_norm_forward(x, scale, shift)
    ln_needs = needs + (True,) * (3 - len(needs))
    full, skipped = F.layer_norm_backward(dout[..., :4], cache), F.layer_norm_backward(dout[..., :4], cache, ln_needs)
    for need, g_full, g in zip(ln_needs, full, skipped):
        assert g is None if not need else np.allclose(g, g_full, rtol=1e-13, atol=1e-13)  # summed in another order


def test_fused_ops_are_told_which_inputs_need_a_gradient():
    # x needs no gradient: linear and layer_norm skip dx; the grads they do return match torch's
    rng = np.random.default_rng(4)
    x, w, scale = rng.standard_normal((3, 4)), rng.standard_normal((2, 4)), rng.standard_normal(4)
    ours_w, ours_scale = Tensor(w, requires_grad=True), Tensor(scale, requires_grad=True)
    out = F.linear(F.layer_norm(Tensor(x), ours_scale, Tensor(np.zeros(4))), ours_w)
    (out * out).sum().backward()
    torch_w, torch_scale = torch.tensor(w, requires_grad=True), torch.tensor(scale, requires_grad=True)
    torch_out = torch.nn.functional.linear(
        torch.nn.functional.layer_norm(torch.tensor(x), (4,), torch_scale, torch.zeros(4, dtype=torch.float64)), torch_w)
    (torch_out * torch_out).sum().backward()
    np.testing.assert_allclose(ours_w.grad, torch_w.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ours_scale.grad, torch_scale.grad.numpy(), rtol=1e-12)
