"""Checkpoints: everything round-trips, nothing is unpickled, and a killed save loses nothing."""
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import tinygrad_llm as tl
from tinygrad_llm import functional as F
from tinygrad_llm.checkpoint import model_from_checkpoint, read_checkpoint

CFG = {"vocab_size": 30, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": False}
IDS, TARGETS = np.array([[1, 2, 3, 4]]), np.array([[2, 3, 4, 5]])


def train_step(model, optimizer):
    optimizer.zero_grad()
    F.cross_entropy(model(IDS), TARGETS).backward()
    optimizer.step()


def trained(seed=0):
    model = tl.GPTModel(CFG, seed=seed)
    optimizer = tl.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_step(model, optimizer)
    return model, optimizer


def assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_round_trip_resumes_training_exactly(tmp_path):
    path = tmp_path / "ck.safetensors"
    model, optimizer = trained()
    tl.manual_seed(42)
    tl.save_checkpoint(path, model, optimizer, step=1, note="hello", losses=[1.5, 2.5])
    expected_draw = tl.backend.generator().random()

    fresh = tl.GPTModel(CFG, seed=99)
    fresh_optimizer = tl.optim.AdamW(fresh.parameters(), lr=5.0)
    tl.manual_seed(0)
    assert tl.load_checkpoint(path, fresh, fresh_optimizer) == {"step": 1, "note": "hello", "losses": [1.5, 2.5]}
    assert tl.backend.generator().random() == expected_draw  # the rng state came back
    assert fresh_optimizer.param_groups[0]["lr"] == 1e-2
    assert_same_weights(model, fresh)
    # The AdamW moments and step counts came back: the next step is identical.
    train_step(model, optimizer)
    train_step(fresh, fresh_optimizer)
    assert_same_weights(model, fresh)


def test_without_optimizer_the_optimizer_state_is_ignored_or_missing(tmp_path):
    path = tmp_path / "ck.safetensors"
    model, optimizer = trained()
    tl.save_checkpoint(path, model, optimizer)
    fresh = tl.GPTModel(CFG, seed=1)
    tl.load_checkpoint(path, fresh)
    assert_same_weights(model, fresh)
    tl.save_checkpoint(path, model)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        tl.load_checkpoint(path, fresh, tl.optim.AdamW(fresh.parameters()))


def test_one_file_with_config_and_no_temporary_left(tmp_path):
    model, optimizer = trained()
    tl.save_checkpoint(tmp_path / "ck.safetensors", model, optimizer, step=3)
    assert os.listdir(tmp_path) == ["ck.safetensors"]
    info = read_checkpoint(tmp_path / "ck.safetensors")
    assert info["config"] == CFG and info["metadata"] == {"step": 3}
    assert info["tensors"]["model.tok_emb.weight"] == ((30, 16), "float32")
    assert info["tensors"]["optimizer.0.exp_avg"] == ((30, 16), "float32")
    rebuilt, _ = model_from_checkpoint(tmp_path / "ck.safetensors")
    assert_same_weights(model, rebuilt)


def test_float64_model_comes_back_as_float64(tmp_path):
    model = tl.GPTModel(CFG, dtype="float64", seed=0)
    tl.save_checkpoint(tmp_path / "ck.safetensors", model)
    rebuilt, _ = model_from_checkpoint(tmp_path / "ck.safetensors")
    assert rebuilt.dtype == np.float64
    assert_same_weights(model, rebuilt)


def test_a_different_architecture_is_refused_naming_the_key(tmp_path):
    tl.save_checkpoint(tmp_path / "ck.safetensors", tl.GPTModel(CFG, seed=0))
    other = tl.GPTModel({**CFG, "n_heads": 4}, seed=0)
    with pytest.raises(ValueError, match="n_heads: checkpoint 2, model 4"):
        tl.load_checkpoint(tmp_path / "ck.safetensors", other)


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        tl.save_checkpoint(tmp_path / "ck.safetensors", tl.GPTModel(CFG, seed=0), step=np.arange(3))


class _Payload:
    """Unpickling this creates the marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"model.tok_emb.weight": _Payload(marker)}))
    pickle.loads(pickle.dumps(_Payload(tmp_path / "self-check")))
    assert (tmp_path / "self-check").exists()  # the payload does work when unpickled

    model = tl.GPTModel(CFG, seed=0)
    for load in (lambda: tl.load_checkpoint(path, model), lambda: read_checkpoint(path),
                 lambda: model_from_checkpoint(path)):
        with pytest.raises(ValueError, match="evil.safetensors is not a safetensors checkpoint"):
            load()
    assert not marker.exists()


def test_a_torch_file_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"tok_emb.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="model.pth is not a safetensors checkpoint"):
        tl.load_checkpoint(path, tl.GPTModel(CFG, seed=0))


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\xff" * 8 + b"{}"])
def test_garbage_is_refused(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.safetensors"):
        tl.load_checkpoint(path, tl.GPTModel(CFG, seed=0))


def test_truncated_and_foreign_safetensors_are_refused(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "ck.safetensors"
    tl.save_checkpoint(path, tl.GPTModel(CFG, seed=0))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="ck.safetensors is not a safetensors checkpoint"):
        tl.load_checkpoint(path, tl.GPTModel(CFG, seed=0))
    save_file({"tok_emb.weight": np.zeros((30, 16), np.float32)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="plain.safetensors is a safetensors file but not a tinygrad_llm checkpoint"):
        tl.load_checkpoint(tmp_path / "plain.safetensors", tl.GPTModel(CFG, seed=0))


def test_a_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here.safetensors"):
        tl.load_checkpoint(tmp_path / "nothing-here.safetensors", tl.GPTModel(CFG, seed=0))


# A child that saves a ~50 MB checkpoint over and over, so a SIGKILL lands mid-save.
SAVE_FOREVER = """
import sys, tinygrad_llm as tl
cfg = {"vocab_size": 50257, "context_length": 8, "emb_dim": 128, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": False}
model = tl.GPTModel(cfg, seed=2)
while True:
    tl.save_checkpoint(sys.argv[1], model, generation="child")
"""


def test_sigkill_while_saving_leaves_the_previous_checkpoint_readable(tmp_path):
    path = tmp_path / "ck.safetensors"
    cfg = {"vocab_size": 50257, "context_length": 8, "emb_dim": 128, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": False}
    previous = tl.GPTModel(cfg, seed=1)
    tl.save_checkpoint(path, previous, generation="parent")

    for _attempt in range(5):
        child = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)])
        try:
            deadline = time.monotonic() + 60
            while not any(name.endswith(".tmp") for name in os.listdir(tmp_path)):
                assert child.poll() is None and time.monotonic() < deadline, "the child never started saving"
                time.sleep(0.001)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        if any(name.endswith(".tmp") for name in os.listdir(tmp_path)):
            break  # killed mid-save: the half-written temporary file is still there
    else:
        pytest.fail("could not kill the child in the middle of a save")

    loaded = tl.GPTModel(cfg, seed=3)
    metadata = tl.load_checkpoint(path, loaded)
    # Whichever complete checkpoint was last renamed into place, it is whole and readable.
    expected = previous if metadata["generation"] == "parent" else tl.GPTModel(cfg, seed=2)
    assert_same_weights(expected, loaded)


def test_a_non_default_layer_norm_eps_survives_a_checkpoint(tmp_path):
    # GPT-2 configs may set layer_norm_epsilon; the model keeps it in its config, and the
    # checkpoint's config rebuilds the same arithmetic.
    model = tl.GPTModel({**CFG, "layer_norm_eps": 1e-3}, dtype="float64", seed=0)
    tl.save_checkpoint(tmp_path / "eps.safetensors", model)
    restored, _ = model_from_checkpoint(tmp_path / "eps.safetensors")
    assert {m.eps for _, m in restored.modules() if isinstance(m, tl.nn.LayerNorm)} == {1e-3}
    # and the rebuilt model computes exactly what the saved one did
    ids = np.array([[1, 2, 3]])
    with tl.no_grad():
        np.testing.assert_array_equal(restored.eval()(ids).numpy(), model.eval()(ids).numpy())


def test_a_tied_head_is_stored_once_and_tied_again(tmp_path):
    # GPT-2 ties its output head to the token embedding: a checkpoint keeps that matrix once
    # (50257 x 768 floats at 124M), and the loaded model shares it again.
    model = tl.GPTModel({**CFG, "tie_weights": True}, dtype="float64", seed=0)
    optimizer = tl.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optimizer)
    tl.save_checkpoint(tmp_path / "tied.safetensors", model, optimizer)
    assert "model.out_head.weight" not in read_checkpoint(tmp_path / "tied.safetensors")["tensors"]
    loaded, _ = model_from_checkpoint(tmp_path / "tied.safetensors", dtype="float64")
    assert loaded.out_head.weight is loaded.tok_emb.weight
    assert_same_weights(model, loaded)
