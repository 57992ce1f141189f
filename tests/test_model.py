"""GPTModel against the book's torch GPTModel (reference/gpt.py), llm.c style.

Same weights in both, then logits, loss and every parameter's gradient must match, and
ten AdamW steps with gradient clipping must give the same losses and weights. Configs
are drawn by hypothesis but kept tiny, so the whole file runs in seconds.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tinygrad_llm as tl
import tinygrad_llm.functional as F
from reference.gpt import GPTModel as TorchGPTModel
from reference.gpt import from_torch_state_dict, load_into_torch
from tinygrad_llm import no_grad

# Tolerances relative to the largest magnitude of the compared array: an element whose
# exact value cancels to about zero has only absolute accuracy at the scale of the terms
# that cancel. Gradients use the largest gradient of the whole model as the floor of that
# scale: the key bias's gradient is exactly zero (softmax ignores a shift shared by a
# row), and computed as the rounding left over from the other gradients' terms.
# float64: a handful of layers of sums of <= 300 terms, each rounded at 1.1e-16, differ
# by far less than 1e-9. float32: the same sums at 6e-8, amplified by LayerNorm's 1/std
# and the softmaxes, stay below 1e-4.
TOLERANCE = {np.float64: 1e-9, np.float32: 1e-4}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}

few = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_close(actual, expected, dtype, what, scale=0.0):
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    scale = max(float(np.abs(expected).max(initial=0.0)), scale, 1e-300)
    error = float(np.abs(np.asarray(actual) - expected).max(initial=0.0)) / scale
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}"


@st.composite
def gpt_cases(draw, max_layers=3):
    """A small config with dropout off, and token ids and targets that fit it."""
    n_heads = draw(st.integers(1, 4))
    cfg = {
        "vocab_size": draw(st.integers(2, 300)),
        "context_length": draw(st.integers(1, 12)),
        "emb_dim": n_heads * draw(st.integers(1, 16)),
        "n_heads": n_heads,
        "n_layers": draw(st.integers(1, max_layers)),
        "drop_rate": 0.0,
        "qkv_bias": draw(st.booleans()),
    }
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, cfg["context_length"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg["vocab_size"], (batch, length))
    targets = rng.integers(0, cfg["vocab_size"], (batch, length))
    return cfg, idx, targets, seed


def twins(cfg, dtype, seed=0, fused=False, device="cpu"):
    """Our GPTModel (on `device`) and the torch reference holding the same weights."""
    model = tl.GPTModel(cfg, dtype=dtype, seed=seed).to(device=device)
    reference = load_into_torch(TorchGPTModel(cfg, fused=fused).to(TORCH_DTYPE[dtype]), model.state_dict())
    return model, reference


def our_loss(model, idx, targets):
    return F.cross_entropy(model(idx), targets)


def torch_loss(reference, idx, targets):
    logits = reference(torch.tensor(idx))
    return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(targets).flatten())


def compare_step(model, reference, idx, targets, dtype):
    """Logits, loss and every parameter's gradient of one forward/backward."""
    logits = model(idx)
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    torch_logits, expected = torch_loss(reference, idx, targets)
    expected.backward()
    assert_close(logits.numpy(), torch_logits, dtype, "logits")
    assert_close(loss.numpy(), expected, dtype, "loss")
    torch_params = dict(reference.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    assert names == list(torch_params)
    largest = max(float(p.grad.abs().max()) for p in torch_params.values())
    for name, p in model.named_parameters():
        assert_close(tl.backend.to_host(p.grad), torch_params[name].grad, dtype, f"gradient of {name}", scale=largest)


# ---- forward and backward against the reference -----------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@few
@given(case=gpt_cases())
def test_logits_loss_and_gradients_match_torch(dtype, case, device):
    cfg, idx, targets, seed = case
    compare_step(*twins(cfg, dtype, seed, device=device), idx, targets, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_tied_weights_get_both_gradients(dtype):
    # The shared matrix collects the embedding's gradient and the output head's.
    cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 12, "n_heads": 3, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True, "tie_weights": True}
    model, reference = twins(cfg, dtype)
    assert model.out_head.weight is model.tok_emb.weight
    assert model.num_parameters() == tl.parameter_counts(cfg)["tied"]
    rng = np.random.default_rng(1)
    compare_step(model, reference, rng.integers(0, 50, (2, 8)), rng.integers(0, 50, (2, 8)), dtype)


def test_benchmark_reference_computes_the_book_function():
    # The benchmark times torch's fused kernels (SDPA, native LayerNorm and GELU): same function.
    cfg = {"vocab_size": 60, "context_length": 9, "emb_dim": 16, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": False}
    model, reference = twins(cfg, np.float64, fused=True)
    rng = np.random.default_rng(2)
    compare_step(model, reference, rng.integers(0, 60, (3, 9)), rng.integers(0, 60, (3, 9)), np.float64)


@settings(max_examples=4, deadline=None)
@given(case=gpt_cases(max_layers=2))
def test_ten_adamw_steps_with_clipping_match_torch(case, device):
    cfg, idx, targets, seed = case
    model, reference = twins(cfg, np.float64, seed, device=device)
    # lr 1e-2 and max_norm 0.5 make the clipping and the weight decay matter at every step.
    optimizer = tl.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    torch_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    losses, torch_losses, norms, torch_norms = [], [], [], []
    for _ in range(10):
        optimizer.zero_grad()
        loss = our_loss(model, idx, targets)
        loss.backward()
        norms.append(float(tl.optim.clip_grad_norm_(model.parameters(), 0.5)))
        optimizer.step()
        losses.append(loss.item())

        torch_optimizer.zero_grad()
        expected = torch_loss(reference, idx, targets)[1]
        expected.backward()
        torch_norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5).item())
        torch_optimizer.step()
        torch_losses.append(expected.item())
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-9)
    np.testing.assert_allclose(norms, torch_norms, rtol=1e-9)
    assert losses[-1] < losses[0]  # the steps did train
    expected_weights = from_torch_state_dict(reference.state_dict())
    for name, value in model.state_dict().items():
        assert_close(value, expected_weights[name], np.float64, f"weight {name} after 10 steps")


# ---- logits at chosen positions -------------------------------------------------------------


@few
@given(case=gpt_cases(), data=st.data())
def test_logits_at_a_mask_are_those_rows_of_the_full_logits_with_their_gradients(case, data):
    # The head and the final norm work row by row, so picking the rows first changes no
    # number: float64 agrees to rounding; the gradients of the rows left out are zero.
    cfg, idx, _, seed = case
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=idx.size, max_size=idx.size))).reshape(idx.shape)
    weights = np.random.default_rng(seed).standard_normal((int(mask.sum()), cfg["vocab_size"]))
    full, picked = (tl.GPTModel(cfg, dtype="float64", seed=seed) for _ in range(2))
    (full(idx)[mask] * weights).sum().backward()
    logits = picked(idx, logits_at=mask)
    assert logits.shape == (int(mask.sum()), cfg["vocab_size"])
    (logits * weights).sum().backward()
    assert_close(logits.numpy(), full(idx).numpy()[mask], np.float64, "logits at the mask")
    largest = max(float(np.abs(q.grad).max(initial=0.0)) for q in full.parameters())  # see TOLERANCE
    for (name, p), q in zip(picked.named_parameters(), full.parameters()):
        assert_close(p.grad, q.grad, np.float64, f"gradient of {name}", scale=largest)


def test_logits_at_runs_the_blocks_on_the_positions_it_needs_alone(monkeypatch):
    # Rows whose last logit is at 2, 5 and 0 of 6 positions need 3 + 6 + 1 = 10 of the 18:
    # each block's attention unpacks 10 rows, and logits and gradients stay the full path's.
    cfg = {"vocab_size": 50, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    idx = np.random.default_rng(0).integers(0, 50, (3, 6))
    mask = np.zeros((3, 6), bool)
    mask[0, [1, 2]] = mask[1, [0, 4, 5]] = mask[2, 0] = True
    unpacked_rows = []
    unpack = F.unpack_rows
    monkeypatch.setattr(F, "unpack_rows", lambda x, keep: (unpacked_rows.append(x.shape[0]), unpack(x, keep))[1])
    weights = np.random.default_rng(1).standard_normal((int(mask.sum()), cfg["vocab_size"]))
    full, packed = (tl.GPTModel(cfg, dtype="float64", seed=2) for _ in range(2))
    (full(idx)[mask] * weights).sum().backward()
    assert unpacked_rows == []  # all logits: nothing to skip
    logits = packed(idx, logits_at=mask)
    (logits * weights).sum().backward()
    assert unpacked_rows == [10] * 3 * cfg["n_layers"]  # queries, keys, values of every block
    assert_close(logits.numpy(), full(idx).numpy()[mask], np.float64, "logits at the mask")
    largest = max(float(np.abs(q.grad).max()) for q in full.parameters())
    for (name, p), q in zip(packed.named_parameters(), full.parameters()):
        assert_close(p.grad, q.grad, np.float64, f"gradient of {name}", scale=largest)


@pytest.mark.parametrize("mask, expected", [(np.ones((1, 3), np.int64), "got int64 of shape \\(1, 3\\)"),
                                            (np.ones((1, 2), bool), "got bool of shape \\(1, 2\\)")])
def test_logits_at_must_be_a_bool_mask_of_the_ids_shape(mask, expected):
    model = tl.GPTModel(tiny_config(), seed=0)
    with pytest.raises(ValueError, match=r"logits_at must be a bool mask of the token ids' shape \(1, 3\), " + expected):
        model(np.zeros((1, 3), np.int64), logits_at=mask)


# ---- the KV cache ------------------------------------------------------------------------


@few
@given(case=gpt_cases(), data=st.data())
def test_kv_cache_prefill_then_one_token_at_a_time_matches_the_full_forward(case, data):
    cfg, idx, _, seed = case
    model = tl.GPTModel(cfg, dtype="float64", seed=seed).eval()
    prefill = data.draw(st.integers(1, idx.shape[1]), label="prefill")
    with no_grad():
        expected = model(idx).numpy()
        cache = model.new_cache(len(idx), cfg["context_length"])
        pieces = [model(idx[:, :prefill], cache=cache).numpy()]
        pieces += [model(idx[:, t:t + 1], cache=cache).numpy() for t in range(prefill, idx.shape[1])]
    assert cache.length == idx.shape[1]
    assert_close(np.concatenate(pieces, axis=1), expected, np.float64, "cached logits")


def test_kv_cache_refuses_more_tokens_than_it_holds():
    model = tl.GPTModel({**tiny_config(), "context_length": 8}, seed=0).eval()
    cache = model.new_cache(1, 4)
    with no_grad():
        model(np.zeros((1, 3), np.int64), cache=cache)
        with pytest.raises(ValueError, match="5 tokens is longer than the context length 4"):
            model(np.zeros((1, 2), np.int64), cache=cache)


# ---- dropout and seeds -------------------------------------------------------------------


def tiny_config(**overrides):
    return {"vocab_size": 40, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
            "drop_rate": 0.0, "qkv_bias": False, **overrides}


def test_eval_mode_is_deterministic_and_equals_no_dropout():
    idx = np.random.default_rng(0).integers(0, 40, (2, 8))
    with_dropout = tl.GPTModel(tiny_config(drop_rate=0.5), seed=3)
    without = tl.GPTModel(tiny_config(), seed=3)
    with_dropout.eval()
    first, second = with_dropout(idx).numpy(), with_dropout(idx).numpy()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, without(idx).numpy())
    assert not np.allclose(with_dropout.train()(idx).numpy(), first)  # train mode does drop


def test_train_mode_dropout_is_reproducible_under_a_seed():
    model = tl.GPTModel(tiny_config(drop_rate=0.3), seed=3)
    idx = np.random.default_rng(0).integers(0, 40, (2, 8))

    def two_forwards(seed):
        tl.manual_seed(seed)
        return model(idx).numpy(), model(idx).numpy()

    first, second = two_forwards(11)
    assert not np.allclose(first, second)  # each forward draws fresh masks
    again = two_forwards(11)
    np.testing.assert_array_equal(first, again[0])
    np.testing.assert_array_equal(second, again[1])


def train_losses(seed, steps=3):
    """Losses of a few AdamW steps with dropout on, everything drawn from `seed`."""
    tl.manual_seed(seed)
    model = tl.GPTModel(tiny_config(drop_rate=0.2))
    optimizer = tl.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx, targets = rng.integers(0, 40, (2, 8)), rng.integers(0, 40, (2, 8))
        optimizer.zero_grad()
        loss = our_loss(model, idx, targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def test_the_same_seed_gives_the_same_weights_and_losses():
    losses, weights = train_losses(5)
    again, weights_again = train_losses(5)
    assert losses == again
    for name in weights:
        np.testing.assert_array_equal(weights[name], weights_again[name])
    assert train_losses(6)[0] != losses


def test_seed_argument_fixes_the_initial_weights():
    first, second = tl.GPTModel(tiny_config(), seed=1), tl.GPTModel(tiny_config(), seed=1)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    other = tl.GPTModel(tiny_config(), seed=2)
    assert not np.array_equal(first.tok_emb.weight.data, other.tok_emb.weight.data)



def test_a_model_built_to_be_loaded_draws_nothing_and_loads_every_weight():
    # init_weights=False is what the loaders use: no random draws (seconds at 124M), and
    # nothing of the unfilled memory may survive a load.
    source = tl.GPTModel(tiny_config(), seed=3)
    tl.manual_seed(5)
    before = tl.get_rng_state()
    empty = tl.GPTModel(tiny_config(), init_weights=False)
    assert tl.get_rng_state() == before
    empty.load_state_dict(source.state_dict())
    for (name, a), b in zip(source.state_dict().items(), empty.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
# ---- parameter counts --------------------------------------------------------------------


def test_the_books_parameter_counts():
    counts = tl.parameter_counts(tl.GPT_CONFIG_124M)
    assert counts["total"] == 163_009_536
    assert counts["tied"] == 124_412_160
    assert round(counts["megabytes"], 2) == 621.83
    assert round(tl.parameter_counts(tl.GPT_CONFIG_124M, "float64")["megabytes"], 2) == 1243.66


# OpenAI's GPT-2 checkpoints (query/key/value biases, head tied to the embedding).
PUBLISHED = {"gpt2-small": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
             "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_counts_are_gpt2s(name):
    cfg = tl.gpt2_config(name, qkv_bias=True)
    assert cfg["context_length"] == 1024 and cfg["vocab_size"] == 50257
    assert tl.parameter_counts(cfg)["tied"] == PUBLISHED[name]
    assert tl.gpt2_config({"gpt2-small": "124M", "gpt2-medium": "355M", "gpt2-large": "774M",
                           "gpt2-xl": "1558M"}[name]) == tl.gpt2_config(name)


@few
@given(case=gpt_cases(), tie=st.booleans())
def test_counts_match_the_built_model(case, tie):
    cfg = {**case[0], "tie_weights": tie}
    counts = tl.parameter_counts(cfg, "float64")
    model = tl.GPTModel(cfg, dtype="float64", seed=0)
    assert model.num_parameters() == (counts["tied"] if tie else counts["total"])
    assert counts["megabytes"] == counts["total"] * 8 / 2**20


# ---- errors at the boundary and the graph --------------------------------------------------


@pytest.mark.parametrize("bad_id", [40, 41, -1])
def test_token_ids_outside_the_vocabulary_are_refused(bad_id):
    model = tl.GPTModel(tiny_config(), seed=0)
    idx = np.array([[1, 2, bad_id]])
    with pytest.raises(ValueError, match=rf"token id {bad_id} is out of range: the vocabulary has 40 entries"):
        model(idx)


def test_sequences_longer_than_the_context_are_refused():
    model = tl.GPTModel(tiny_config(), seed=0)
    with pytest.raises(ValueError, match="sequence of 9 tokens is longer than the context length 8"):
        model(np.zeros((1, 9), np.int64))


def test_no_graph_is_built_under_no_grad():
    model = tl.GPTModel(tiny_config(), seed=0)
    idx = np.zeros((1, 4), np.int64)
    assert model(idx)._parents  # with gradients on, the logits remember their inputs
    with no_grad():
        logits = model(idx)
    assert not logits.requires_grad and logits._parents == () and logits._backward is None


def test_load_state_dict_takes_the_books_masks_and_checks_shapes():
    cfg = tiny_config(qkv_bias=True)
    torch.manual_seed(0)
    reference = TorchGPTModel(cfg).double()
    state = from_torch_state_dict(reference.state_dict())
    assert "trf_blocks.1.att.mask" in state
    model = tl.GPTModel(cfg, dtype="float64", seed=0).load_state_dict(state)
    idx = np.random.default_rng(0).integers(0, 40, (2, 8))
    assert_close(model(idx).numpy(), reference(torch.tensor(idx)), np.float64, "logits after loading")

    state["pos_emb.weight"] = np.zeros((9, 16))
    with pytest.raises(ValueError, match=r"pos_emb.weight.*\(9, 16\).*\(8, 16\)"):
        model.load_state_dict(state)
