"""LoRA (appendix E): the book's count, adapters that start as a no-op, merging, files, and the torch twin.

The fused op itself (`F.lora_linear`) is in tests/op_table.py with every other op.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import tinygrad_llm as tl
import tinygrad_llm.functional as F
from reference import lora as torch_lora
from reference.gpt import GPTModel as TorchGPTModel
from reference.gpt import from_torch_state_dict, load_into_torch
from tests.classifier_twin import assert_same_classifier_runs
from tinygrad_llm import Tensor, nn, no_grad
from tinygrad_llm.finetune.classify import prepare_classifier
from tinygrad_llm.lora import (LinearWithLoRA, LoRALayer, load_lora, lora_layers, merge_lora, replace_linear_with_lora,
                               save_lora)

TINY = {"vocab_size": 40, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}
LINEARS_PER_BLOCK = 6  # W_query, W_key, W_value, out_proj, ff.layers.0, ff.layers.2


def classifier(cfg=TINY, dtype="float64", seed=0):
    """The book's chapter 6 surgery on a GPT: a 2-class head, then everything frozen."""
    model = tl.GPTModel(cfg, dtype=dtype, seed=seed)
    model.out_head = nn.Linear(cfg["emb_dim"], 2, dtype=dtype, rng=np.random.default_rng(seed + 1))
    for p in model.parameters():
        p.requires_grad = False
    return model


def ids(batch=3, length=6, vocab=TINY["vocab_size"], seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def randomize_adapters(model, seed=1):
    """Nonzero B (and new A): adapters that change the outputs, as trained ones do."""
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model).values():
        layer.lora.A.data[...] = rng.standard_normal(layer.lora.A.shape)
        layer.lora.B.data[...] = rng.standard_normal(layer.lora.B.shape)


def logits_of(model, batch):
    with no_grad():
        return model(batch).numpy()


# ---- the book's numbers ------------------------------------------------------------------


def test_gpt2_124m_with_a_two_class_head_has_the_books_2666528_lora_parameters():
    cfg = tl.gpt2_config("gpt2-small", drop_rate=0.0, qkv_bias=True)
    model = tl.GPTModel(cfg, init_weights=False)  # shapes only: nothing drawn
    model.out_head = nn.Linear(768, 2)
    assert model.num_parameters(trainable=True) == 124_441_346  # the book's "before"
    for p in model.parameters():
        p.requires_grad = False
    assert model.num_parameters(trainable=True) == 0
    replace_linear_with_lora(model, rank=16, alpha=16)
    assert model.num_parameters(trainable=True) == 2_666_528
    assert len(lora_layers(model)) == 12 * LINEARS_PER_BLOCK + 1

    # The book's torch code counts the same (on the meta device: no memory, no init time).
    with torch.device("meta"):
        twin = TorchGPTModel(cfg)
        twin.out_head = torch.nn.Linear(768, 2)
        for p in twin.parameters():
            p.requires_grad = False
        torch_lora.replace_linear_with_lora(twin, rank=16, alpha=16)
    assert sum(p.numel() for p in twin.parameters() if p.requires_grad) == 2_666_528


def test_A_is_uniform_within_torchs_kaiming_bound_and_B_is_zero():
    rank = 4
    layer = LoRALayer(300, 5, rank=rank, alpha=8, dtype="float64", rng=np.random.default_rng(0))
    torch.manual_seed(0)
    twin = torch_lora.LoRALayer(300, 5, rank=rank, alpha=8)
    bound = 1 / math.sqrt(rank)
    # torch's kaiming_uniform_(a=sqrt(5)) on an (in, rank) tensor draws from U(+-1/sqrt(rank)):
    # 1200 draws reach within 1% of the bound, and so must ours.
    for A in (layer.A.numpy(), twin.A.detach().numpy()):
        assert np.abs(A).max() <= bound and np.abs(A).max() > 0.99 * bound
    assert not layer.B.numpy().any()
    assert layer.scale == 2.0


def test_rank_and_alpha_are_checked():
    for rank in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
            LoRALayer(4, 4, rank=rank, alpha=1)
    with pytest.raises(ValueError, match="LoRA alpha must be a finite number"):
        LoRALayer(4, 4, rank=2, alpha=float("nan"))


# ---- adapting a model ----------------------------------------------------------------------


def test_every_linear_is_wrapped_and_only_the_adapters_train():
    model = classifier()
    replace_linear_with_lora(model, rank=2, alpha=4)
    expected = [f"trf_blocks.{i}.{name}" for i in range(2) for name in
                ("att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.layers.0", "ff.layers.2")]
    assert list(lora_layers(model)) == expected + ["out_head"]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{name}.lora.{part}" for name in expected + ["out_head"] for part in "AB"]
    assert isinstance(model.trf_blocks[0].att.W_query.linear, nn.Linear)
    assert model.out_head.weight is model.out_head.linear.weight and model.out_head.weight.shape == (2, 8)


def test_adapting_twice_is_refused():
    model = classifier()
    replace_linear_with_lora(model, rank=2, alpha=4)
    with pytest.raises(ValueError, match="already has LoRA adapters .*merge_lora"):
        replace_linear_with_lora(model, rank=2, alpha=4)


def test_with_B_zero_the_adapted_model_computes_the_base_models_outputs():
    model, batch = classifier(), ids()
    base = logits_of(model, batch)
    replace_linear_with_lora(model, rank=2, alpha=16)
    # Only the order of BLAS's sums may differ (the adapter's x A is computed beside x W^T).
    np.testing.assert_allclose(logits_of(model, batch), base, rtol=1e-13, atol=1e-13)


def test_frozen_weights_get_no_gradient_and_the_adapters_match_torchs():
    model, batch = classifier(), ids()
    replace_linear_with_lora(model, rank=3, alpha=6)
    randomize_adapters(model)
    twin = TorchGPTModel(TINY)
    twin.out_head = torch.nn.Linear(8, 2)
    for p in twin.parameters():
        p.requires_grad = False
    torch_lora.replace_linear_with_lora(twin, rank=3, alpha=6)
    twin.double()
    load_into_torch(twin, model.state_dict())

    logits = model(batch)
    loss = F.cross_entropy(logits[:, -1, :], np.array([0, 1, 1]))
    loss.backward()
    twin_loss = torch.nn.functional.cross_entropy(twin(torch.as_tensor(batch))[:, -1, :], torch.tensor([0, 1, 1]))
    twin_loss.backward()
    # float64: a few layers of short sums, rounded at 1e-16
    assert abs(loss.item() - twin_loss.item()) < 1e-12
    twin_params = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            np.testing.assert_allclose(p.grad, twin_params[name].grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def test_the_frozen_front_records_no_graph():
    # Embeddings and LayerNorm are frozen: the first W_query's input is a constant, and the
    # graph starts at the adapters.
    model = classifier()
    replace_linear_with_lora(model, rank=2, alpha=2)
    block = model.trf_blocks[0]
    x = block.norm1(model.tok_emb(ids()) + model.pos_emb(np.arange(6)))
    assert not x.requires_grad and x._parents == ()
    out = block.att.W_query(x)
    lora = block.att.W_query.lora
    assert out.requires_grad and [p for p in out._parents if p.requires_grad] == [lora.A, lora.B]


def test_the_backward_pass_computes_no_gradient_for_a_frozen_weight_or_input():
    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal((4, 5)), rng.standard_normal((3, 5)), rng.standard_normal(3)
    A, B = rng.standard_normal((5, 2)), rng.standard_normal((2, 3))
    out, cache = F.lora_linear_forward(x, W, b, A, B, scale=0.5)
    dx, dW, db, dA, dB = F.lora_linear_backward(np.ones_like(out), cache, needs_grad=(False, False, False, True, True))
    assert dx is None and dW is None and db is None
    assert dA.shape == A.shape and dB.shape == B.shape


def test_linear_with_lora_is_the_books_linear_plus_lora_layer():
    rng = np.random.default_rng(0)
    layer = LinearWithLoRA(nn.Linear(5, 3, dtype="float64"), rank=2, alpha=3)
    layer.lora.B.data[...] = rng.standard_normal((2, 3))
    x = Tensor(rng.standard_normal((2, 4, 5)))
    expected = (layer.linear(x) + layer.lora(x)).numpy()
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-13, atol=1e-13)


# ---- merging ---------------------------------------------------------------------------


def test_merging_keeps_the_outputs_and_gives_back_plain_linears():
    model, batch = classifier(), ids()
    plain_keys = list(model.state_dict())
    replace_linear_with_lora(model, rank=2, alpha=4)
    randomize_adapters(model)
    adapted = logits_of(model, batch)
    frozen_weight = model.trf_blocks[0].att.W_query.linear.weight.numpy().copy()
    base_array = model.trf_blocks[0].att.W_query.linear.weight.data

    merge_lora(model)
    assert lora_layers(model) == {} and isinstance(model.trf_blocks[0].att.W_query, nn.Linear)
    # float64: W + s (A B)^T rounds each weight once more than the separate paths do.
    np.testing.assert_allclose(logits_of(model, batch), adapted, rtol=1e-10, atol=1e-11)
    assert list(model.state_dict()) == plain_keys
    np.testing.assert_array_equal(base_array, frozen_weight)  # a new array: the old one is untouched
    fresh = tl.GPTModel(TINY, dtype="float64", init_weights=False)
    fresh.out_head = nn.Linear(8, 2, dtype="float64")
    fresh.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(logits_of(fresh, batch), logits_of(model, batch))


def test_merging_into_a_tied_output_head_unties_it(tmp_path):
    cfg = {**TINY, "tie_weights": True}
    model, batch = tl.GPTModel(cfg, dtype="float64", seed=0), ids()
    embedding = model.tok_emb.weight.numpy().copy()
    for p in model.parameters():
        p.requires_grad = False
    replace_linear_with_lora(model, rank=2, alpha=2)
    randomize_adapters(model)
    adapted = logits_of(model, batch)
    merge_lora(model)
    assert model.out_head.weight is not model.tok_emb.weight
    np.testing.assert_array_equal(model.tok_emb.weight.numpy(), embedding)
    assert model.cfg["tie_weights"] is False  # so checkpoints store the merged head
    tl.save_checkpoint(tmp_path / "merged.safetensors", model)
    restored = tl.GPTModel(model.cfg, dtype="float64", init_weights=False)
    tl.load_checkpoint(tmp_path / "merged.safetensors", restored)
    np.testing.assert_allclose(logits_of(restored, batch), adapted, rtol=1e-10, atol=1e-11)


# ---- adapters on disk -----------------------------------------------------------------------


def adapted_classifier(rank=2, alpha=4, cfg=TINY, seed=0):
    model = classifier(cfg, seed=seed)
    replace_linear_with_lora(model, rank=rank, alpha=alpha)
    return model


def test_saved_adapters_load_into_a_fresh_adaptation_of_the_same_base(tmp_path):
    trained, batch = adapted_classifier(), ids()
    randomize_adapters(trained)
    path = tmp_path / "adapters.safetensors"
    save_lora(path, trained)

    other = adapted_classifier()  # same base weights, adapters drawn afresh
    assert not np.array_equal(logits_of(other, batch), logits_of(trained, batch))
    assert load_lora(path, other) is other
    np.testing.assert_array_equal(logits_of(other, batch), logits_of(trained, batch))
    # The adapters alone: A and B of 13 layers, not the base weights.
    n_adapter = sum(p.size for p in other.parameters() if p.requires_grad)
    assert path.stat().st_size < 8 * n_adapter + 8192


def test_adapters_load_into_a_float32_model(tmp_path):
    trained = adapted_classifier()
    randomize_adapters(trained)
    save_lora(tmp_path / "a.safetensors", trained)
    model = classifier(dtype="float32")
    replace_linear_with_lora(model, rank=2, alpha=4)
    load_lora(tmp_path / "a.safetensors", model)
    A = model.out_head.lora.A
    assert A.dtype == np.float32
    np.testing.assert_allclose(A.numpy(), trained.out_head.lora.A.numpy(), rtol=1e-7)


def expect_refusal(path, model, match, error=ValueError):
    before = {name: p.numpy().copy() for name, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        load_lora(path, model)
    for name, p in model.named_parameters():  # nothing copied from a file that does not fit
        np.testing.assert_array_equal(p.numpy(), before[name], err_msg=name)


def test_a_file_of_another_rank_is_refused_naming_both(tmp_path):
    save_lora(tmp_path / "r2.safetensors", adapted_classifier(rank=2))
    expect_refusal(tmp_path / "r2.safetensors", adapted_classifier(rank=3),
                   r"trf_blocks\.0\.att\.W_query\.lora\.A has shape \(8, 2\), the model's has \(8, 3\) "
                   r"\(rank 2 in the file, 3 in the model\)")


def test_a_file_of_another_alpha_is_refused(tmp_path):
    save_lora(tmp_path / "a4.safetensors", adapted_classifier(alpha=4))
    expect_refusal(tmp_path / "a4.safetensors", adapted_classifier(alpha=8),
                   "was trained with alpha 4, the model's has alpha 8")


def test_missing_and_extra_adapters_are_named(tmp_path):
    save_lora(tmp_path / "two.safetensors", adapted_classifier())
    deeper = adapted_classifier(cfg={**TINY, "n_layers": 3})
    expect_refusal(tmp_path / "two.safetensors", deeper,
                   r"missing from the file: trf_blocks\.2\.att\.W_query, .* and 1 more")
    save_lora(tmp_path / "three.safetensors", deeper)
    expect_refusal(tmp_path / "three.safetensors", adapted_classifier(),
                   r"not in the model: trf_blocks\.2\.att\.W_query, .* and 1 more")


def test_a_file_lacking_a_tensor_is_refused(tmp_path):
    model = adapted_classifier()
    save_lora(tmp_path / "a.safetensors", model)
    from safetensors import safe_open
    with safe_open(tmp_path / "a.safetensors", framework="np") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys() if key != "out_head.lora.B"}
        metadata = f.metadata()
    save_file(tensors, tmp_path / "b.safetensors", metadata=metadata)
    expect_refusal(tmp_path / "b.safetensors", model, r"tensors \(missing from the file: out_head\.lora\.B\)")


def test_integer_adapters_are_refused(tmp_path):
    model = adapted_classifier()
    save_lora(tmp_path / "a.safetensors", model)
    from safetensors import safe_open
    with safe_open(tmp_path / "a.safetensors", framework="np") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    tensors["out_head.lora.A"] = tensors["out_head.lora.A"].astype(np.int64)
    save_file(tensors, tmp_path / "int.safetensors", metadata=metadata)
    expect_refusal(tmp_path / "int.safetensors", model, r"out_head\.lora\.A has dtype I64, expected a float")


def test_files_that_are_not_adapters_are_refused(tmp_path):
    model = adapted_classifier()
    expect_refusal(tmp_path / "nowhere.safetensors", model, "does not exist", FileNotFoundError)
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01 not a safetensors file")
    expect_refusal(tmp_path / "junk.bin", model, "is not a safetensors file")
    torch.save({"out_head.lora.A": torch.zeros(8, 2)}, tmp_path / "adapters.pt")
    expect_refusal(tmp_path / "adapters.pt", model, "is not a safetensors file .*never unpickled")
    tl.save_checkpoint(tmp_path / "checkpoint.safetensors", tl.GPTModel(TINY, seed=0))
    expect_refusal(tmp_path / "checkpoint.safetensors", model, "not LoRA adapters saved by save_lora")


def test_a_model_without_adapters_cannot_save_or_load_them(tmp_path):
    save_lora(tmp_path / "a.safetensors", adapted_classifier())
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        save_lora(tmp_path / "b.safetensors", classifier())
    with pytest.raises(ValueError, match="the model has no LoRA adapters; call replace_linear_with_lora"):
        load_lora(tmp_path / "a.safetensors", classifier())


def test_adapters_train_merge_and_round_trip_on_each_device(device, tmp_path):
    batch = ids()
    reference = adapted_classifier()
    randomize_adapters(reference)
    expected = logits_of(reference, batch)
    save_lora(tmp_path / "a.safetensors", reference)

    model = classifier().to(device=device)
    replace_linear_with_lora(model, rank=2, alpha=4)
    assert model.out_head.lora.A.device == device
    load_lora(tmp_path / "a.safetensors", model)
    assert model.out_head.lora.B.device == device
    np.testing.assert_allclose(logits_of(model, batch), expected, rtol=1e-12, atol=1e-12)
    loss = F.cross_entropy(model(batch)[:, -1, :], tl.tensor(np.array([0, 1, 1]), device=device))
    loss.backward()
    assert model.out_head.lora.B.grad.shape == (2, 2) and model.out_head.linear.weight.grad is None
    save_lora(tmp_path / "b.safetensors", model)
    merge_lora(model)
    assert model.out_head.weight.device == device
    np.testing.assert_allclose(logits_of(model, batch), expected, rtol=1e-10, atol=1e-11)
    again = adapted_classifier()
    load_lora(tmp_path / "b.safetensors", again)
    np.testing.assert_array_equal(logits_of(again, batch), expected)


# ---- the book's LoRA fine-tune, step for step against torch ----------------------------------

CLASSIFIER = {"vocab_size": 50257, "context_length": 12, "emb_dim": 8, "n_heads": 2, "n_layers": 2,
              "drop_rate": 0.0, "qkv_bias": True}  # the whole vocabulary, so the pad id 50256 is a token


def spam_like_batches(rng, n_batches, batch_size=3, length=6, vocab=60, pad_token_id=50256):
    """Texts of 1..length random tokens right-padded as SpamDataset pads them, and random labels."""
    batches = []
    for _ in range(n_batches):
        batch = rng.integers(0, vocab, (batch_size, length))
        lengths = rng.integers(1, length + 1, batch_size)
        batch[np.arange(length)[None, :] >= lengths[:, None]] = pad_token_id
        batches.append((batch, rng.integers(0, 2, batch_size)))
    return batches


@settings(max_examples=4, deadline=None)
@given(n_layers=st.integers(1, 2), rank=st.sampled_from([1, 2, 4]), alpha=st.sampled_from([1, 4, 16]),
       token=st.sampled_from(["last", "last-real", "mean"]), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2**16))
def test_the_books_lora_fine_tune_matches_torch_step_for_step(n_layers, rank, alpha, token, dtype, seed):
    cfg = {**CLASSIFIER, "n_layers": n_layers}
    rng = np.random.default_rng(seed)
    train_batches, val_batches = spam_like_batches(rng, 10), spam_like_batches(rng, 3)
    # Appendix E: the chapter 6 head, everything frozen (the head too), every Linear adapted.
    model = prepare_classifier(tl.GPTModel(cfg, dtype=dtype, seed=seed), trainable="head", seed=seed)
    for p in model.parameters():
        p.requires_grad = False
    replace_linear_with_lora(model, rank=rank, alpha=alpha)
    twin = TorchGPTModel(cfg)
    twin.out_head = torch.nn.Linear(cfg["emb_dim"], 2)
    for p in twin.parameters():
        p.requires_grad = False
    torch_lora.replace_linear_with_lora(twin, rank=rank, alpha=alpha)
    load_into_torch(twin.to(torch.float64 if dtype == "float64" else torch.float32), model.state_dict())
    rtol = assert_same_classifier_runs(model, twin, train_batches, val_batches, dtype, token)
    twin_state = from_torch_state_dict(twin.state_dict())
    for name, array in model.state_dict().items():
        # AdamW divides by sqrt(v): an entry whose gradients were ~0 moves by rounding-sized steps
        np.testing.assert_allclose(array, twin_state[name], rtol=rtol * 10, atol=rtol * 1e-2, err_msg=name)
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {f"{name}.lora.{part}" for name in lora_layers(model) for part in "AB"}
    assert not np.array_equal(model.out_head.lora.B.numpy(), 0)  # B moved off zero: the adapters learned
