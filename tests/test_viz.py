"""The backprop study tools: the DOT graph of a loss and the gradient trace of one backward pass."""
import re
import shutil

import numpy as np
import pytest

import tinygrad_llm as tl
import tinygrad_llm.functional as F
from tinygrad_llm import Tensor, viz

CFG = {"vocab_size": 20, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1, "drop_rate": 0.0,
       "qkv_bias": False}


def gpt_loss():
    model = tl.GPTModel(CFG, dtype="float64", seed=0)
    loss = F.cross_entropy(model(np.array([[1, 2, 3, 4]])), np.array([[2, 3, 4, 5]]))
    return model, loss


def test_dot_graph_of_the_gpt_loss_names_ops_shapes_and_parameters():
    model, loss = gpt_loss()
    dot = viz.to_dot(loss, dict(model.named_parameters()))
    assert dot.startswith("digraph loss {") and dot.rstrip().endswith("}")
    labels = dict(re.findall(r'(n\d+) \[label="([^"]*)"', dot))
    edges = re.findall(r"(n\d+) -> (n\d+);", dot)
    assert all(a in labels and b in labels for a, b in edges)  # every edge joins declared nodes
    texts = list(labels.values())
    for op in ("cross_entropy", "linear", "layer_norm", "gelu", "scaled_dot_product_attention", "embedding"):
        assert any(t.startswith(op + "\\n") for t in texts), op
    assert "cross_entropy\\nscalar float64" in texts
    assert "tok_emb.weight\\n20x8 float64" in texts and "out_head.weight\\n20x8 float64" in texts
    # every parameter is a leaf of the graph, each drawn once
    assert sum(t.split("\\n")[0] in dict(model.named_parameters()) for t in texts) == len(model.parameters())


def test_svg_needs_graphviz(tmp_path, monkeypatch):
    _, loss = gpt_loss()
    assert viz.save_graph(loss, tmp_path / "g.dot").read_text() == viz.to_dot(loss)
    if shutil.which("dot"):
        assert b"<svg" in viz.save_graph(loss, tmp_path / "g.svg").read_bytes()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="Graphviz"):
        viz.save_graph(loss, tmp_path / "g.svg")


def test_gradient_trace_records_every_node_of_one_backward_pass():
    x = Tensor(np.array([[1.0, -2.0, 3.0]]), requires_grad=True)
    w = Tensor(np.array([[0.5, 1.0, -1.0], [2.0, 0.0, 1.0]]), requires_grad=True)
    loss = (F.linear(x, w) * 3.0).sum()
    rows = viz.gradient_trace(loss, {"x": x, "w": w})
    assert [r["op"] for r in rows][:3] == ["sum", "mul", "linear"]
    assert rows[0]["norm"] == 1.0 and rows[0]["shape"] == ()
    by_op = {r["op"]: r for r in rows}
    np.testing.assert_allclose(by_op["w"]["norm"], np.linalg.norm(w.grad))
    np.testing.assert_allclose(by_op["x"]["max"], np.abs(x.grad).max())
    np.testing.assert_allclose(by_op["linear"]["norm"], 3.0 * np.sqrt(2))  # d(3 sum(y))/dy = 3 per element
    assert "grad norm" in viz.format_trace(rows)
    assert _hook_is_unset()


def test_gradient_trace_of_the_gpt_loss_reaches_every_parameter():
    model, loss = gpt_loss()
    rows = viz.gradient_trace(loss, dict(model.named_parameters()))
    traced = {r["op"]: r["norm"] for r in rows}
    for name, p in model.named_parameters():
        np.testing.assert_allclose(traced[name], np.linalg.norm(p.grad), rtol=1e-12)


def _hook_is_unset():
    import importlib
    return importlib.import_module("tinygrad_llm.tensor").gradient_hook is None
