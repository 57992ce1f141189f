"""Hostile and careless input at each boundary: one clear error naming the thing, never garbage.

One section per boundary, each with one helper that applies a case and checks the refusal,
so a new case is one more row: config dicts, checkpoint files, Hugging Face folders.
"""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import tinygrad_llm as tl
from tinygrad_llm.checkpoint import check_train_state, model_from_checkpoint, read_checkpoint
from tinygrad_llm.weights import load_book_state_dict, load_hf_gpt2, save_hf_gpt2

CFG = {"vocab_size": 30, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": False}
IDS = np.array([[1, 2, 3, 4]])


# ---- config dicts -------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"n_layers": -1}, "n_layers must be an integer >= 1, got -1"),
    ({"n_layers": 0}, "n_layers must be an integer >= 1, got 0"),
    ({"n_heads": 0}, "n_heads must be an integer >= 1"),
    ({"emb_dim": 16.0}, r"emb_dim must be an integer, got 16.0 \(float\)"),
    ({"vocab_size": "30"}, "vocab_size must be an integer, got '30'"),
    ({"context_length": True}, "context_length must be an integer, got True"),
    ({"drop_rate": 1.0}, r"drop_rate must be >= 0.0 and < 1.0, got 1.0"),
    ({"drop_rate": float("nan")}, "drop_rate must be a finite number"),
    ({"qkv_bias": "yes"}, "qkv_bias must be true or false"),
    ({"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0.0"),
    ({"emb_dim": 15}, "emb_dim 15 must be divisible by n_heads 2"),
    ({"emb_dim": 2**40}, "describes a model of .* GiB .* more than this machine's"),
])
def test_a_bad_config_field_is_named_with_its_range(change, message):
    with pytest.raises(ValueError, match=message):
        tl.GPTModel({**CFG, **change})


def test_a_config_missing_keys_names_them():
    config = dict(CFG)
    del config["n_heads"]
    with pytest.raises(ValueError, match=r"missing \['n_heads'\]"):
        tl.GPTModel(config)


# ---- checkpoint files ---------------------------------------------------------------------------

def trained_checkpoint(path, optimizer=True, **metadata):
    model = tl.GPTModel(CFG, seed=0)
    adamw = tl.optim.AdamW(model.parameters(), lr=1e-2)
    model_loss = tl.functional.cross_entropy(model(IDS), IDS)
    model_loss.backward()
    adamw.step()
    tl.save_checkpoint(path, model, adamw if optimizer else None, **metadata)
    return model


def tamper(path, tensors=None, header=None):
    """Rewrite the checkpoint at `path` after `tensors(dict)` / `header(dict)` changed its parts in place."""
    with safe_open(path, framework="np") as f:
        arrays = {name: f.get_tensor(name) for name in f.keys()}
        metadata = dict(f.metadata())
    if tensors:
        tensors(arrays)
    if header:
        header(metadata)
    save_file(arrays, path, metadata=metadata)


def set_json(key, change):
    def apply(header):
        value = json.loads(header[key])
        change(value)
        header[key] = json.dumps(value)
    return apply


def nan_at(name, index=(0, 0)):
    def apply(arrays):
        arrays[name][index] = np.nan
    return apply


@pytest.mark.parametrize("tensors, header, message", [
    (lambda t: t.update({"model.tok_emb.weight": (t["model.tok_emb.weight"] * 100).astype(np.int8)}), None,
     r"tensor 'tok_emb.weight' has dtype I8; weights must be float"),
    (lambda t: t.update({"model.pos_emb.weight": t["model.pos_emb.weight"].view(np.int32)}), None,
     r"tensor 'pos_emb.weight' has dtype I32"),
    (nan_at("model.trf_blocks.0.norm1.scale", 3), None, r"tensor 'trf_blocks.0.norm1.scale' holds nan at flat index 3"),
    (lambda t: t["model.out_head.weight"].__setitem__((1, 2), np.inf), None, r"'out_head.weight' holds inf"),
    (lambda t: t.pop("model.final_norm.shift"), None, r"missing final_norm.shift"),
    (lambda t: t.update({"model.trf_blocks.1.norm1.scale": np.ones(16, np.float32)}), None,
     r"unexpected trf_blocks.1.norm1.scale"),
    (lambda t: t.update({"model.pos_emb.weight": np.ones((9, 16), np.float32)}), None,
     r"'pos_emb.weight' has shape \(9, 16\), expected \(8, 16\)"),
    (None, lambda h: h.pop("config"), r"header lacks \['config'\]"),
    (None, lambda h: h.pop("rng_state"), r"header lacks \['rng_state'\]"),
    (None, lambda h: h.update(config="{not json"), "the checkpoint's config is not valid JSON"),
    (None, lambda h: h.update(metadata="[1, 2]"), "the checkpoint's metadata must be a JSON object"),
    (None, set_json("config", lambda c: c.update(n_layers=-1)), "config: n_layers must be an integer >= 1"),
    (None, lambda h: h.update(rng_state='{"bit_generator": "PCG64", "state": 5}'),
     "rng_state is not the state of a NumPy random generator"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_part(tmp_path, tensors, header, message):
    path = tmp_path / "ck.safetensors"
    trained_checkpoint(path)
    tamper(path, tensors, header)
    model = tl.GPTModel(CFG, seed=5)
    before = {name: value.copy() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as error:
        tl.load_checkpoint(path, model)
    assert "ck.safetensors" in str(error.value)
    for name, value in model.state_dict().items():  # nothing was written before the refusal
        np.testing.assert_array_equal(value, before[name], err_msg=name)


@pytest.mark.parametrize("tensors, header, message", [
    (nan_at("optimizer.3.exp_avg_sq", 0), None, "optimizer exp_avg_sq of parameter 3 holds nan"),
    (lambda t: t.update({"optimizer.2.exp_avg": np.zeros(3, np.float32)}), None,
     r"optimizer exp_avg of parameter 2 has shape \(3,\)"),
    (lambda t: t.update({"optimizer.99.exp_avg": np.zeros(3, np.float32)}), None, "unexpected optimizer tensor"),
    (None, set_json("optimizer", lambda o: o["param_groups"][0].update(lr=-1.0)), "optimizer lr must be >= 0.0"),
    (None, set_json("optimizer", lambda o: o.update(num_params=3)), "optimizer state for 3 parameters"),
    (None, set_json("optimizer", lambda o: o["state"]["0"].update(step=-4)), "optimizer step of parameter 0"),
    (None, set_json("optimizer", lambda o: o.pop("param_groups")), r"optimizer header lacks \['param_groups'\]"),
])
def test_bad_optimizer_state_is_refused_before_the_weights_are_touched(tmp_path, tensors, header, message):
    path = tmp_path / "ck.safetensors"
    trained_checkpoint(path)
    tamper(path, tensors, header)
    model = tl.GPTModel(CFG, seed=5)
    optimizer = tl.optim.AdamW(model.parameters(), lr=0.5)
    before = {name: value.copy() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        tl.load_checkpoint(path, model, optimizer)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert optimizer.state == {} and optimizer.param_groups[0]["lr"] == 0.5


def test_float16_and_bfloat16_checkpoint_tensors_are_converted_explicitly(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch_file

    path = tmp_path / "ck.safetensors"
    model = trained_checkpoint(path, optimizer=False)
    with safe_open(path, framework="np") as f:
        arrays, header = {name: f.get_tensor(name) for name in f.keys()}, f.metadata()
    half = {name: torch.tensor(value).to(torch.bfloat16 if "norm" in name else torch.float16)
            for name, value in arrays.items()}
    save_torch_file(half, path, metadata=header)
    loaded, _ = model_from_checkpoint(path)
    assert loaded.dtype == np.float32
    for name, value in loaded.state_dict().items():
        np.testing.assert_array_equal(value, half[f"model.{name}"].float().numpy(), err_msg=name)
        assert np.abs(value - model.state_dict()[name]).max() < 1e-2 * max(1, np.abs(model.state_dict()[name]).max())


@pytest.mark.parametrize("change, message", [
    ({"step": -1}, "train_state step must be an integer >= 0, got -1"),
    ({"epoch": 10**12}, "train_state epoch 1000000000000 is past the run's 2 epochs"),
    ({"batch": 50}, "train_state batch 50 is past the end of an epoch of 8 batches"),
    ({"step": 7}, "train_state step 7 does not match epoch 1 and batch 2"),
    ({"seen": 1.5}, "train_state seen must be an integer"),
    ({"seconds": -3.0}, "train_state seconds must be >= 0.0"),
    ({"history": ["x"]}, "train_state history must be a list of records"),
    ({"peak_lrs": [float("nan")]}, "peak_lrs must be a finite number"),
    ({"generators": {"global": {"bit_generator": "Nope"}}}, "generators global is not the state"),
    ({"epoch_generators": None}, "stops mid-epoch but lacks the epoch's generator states"),
])
def test_a_tampered_train_state_is_refused_naming_the_field(change, message):
    # 8 batches per epoch, 2 per step: epoch 1 and batch 2 are step 4 + 1.
    state = {"step": 5, "epoch": 1, "batch": 2, "seen": 96, "seconds": 1.0, "peak_lrs": [4e-4],
             "generators": {"global": tl.backend.get_rng_state()}, "epoch_generators": {"global": tl.backend.get_rng_state()},
             "history": [{"event": "eval", "step": 0}]}
    check_train_state(state, "ck.safetensors", 8, accumulation_steps=2, num_epochs=2)  # the untampered state passes
    with pytest.raises(ValueError, match=f"ck.safetensors: .*{message}"):
        check_train_state({**state, **change}, "ck.safetensors", 8, accumulation_steps=2, num_epochs=2)


def test_resume_refuses_a_train_state_past_the_end_of_the_run(tmp_path):
    from tinygrad_llm.train import train_model_simple

    batches = [(IDS, IDS)] * 3
    path = tmp_path / "ck.safetensors"

    def run(resume, epochs=1):
        model = tl.GPTModel(CFG, seed=0)
        optimizer = tl.optim.AdamW(model.parameters(), lr=1e-3)
        return train_model_simple(model, batches, batches, optimizer, None, epochs, 1, 1, None, None,
                                  checkpoint_path=path, resume=resume, progress=False)

    run(resume=False)
    tamper(path, header=set_json("metadata", lambda m: m["train_state"].update(step=10**9)))
    with pytest.raises(ValueError, match="train_state step 1000000000 does not match epoch 1 and batch 0"):
        run(resume=True, epochs=2)


def test_read_checkpoint_shows_half_precision_names(tmp_path):
    path = tmp_path / "ck.safetensors"
    trained_checkpoint(path, optimizer=False)
    tamper(path, lambda t: t.update({"model.tok_emb.weight": t["model.tok_emb.weight"].astype(np.float16)}))
    assert read_checkpoint(path)["tensors"]["model.tok_emb.weight"] == ((30, 16), "float16")


# A child that saves a checkpoint under RLIMIT_FSIZE: every write past the limit fails as on
# a full disk (EFBIG; SIGXFSZ is ignored so the write returns the error instead of killing).
SAVE_ON_A_FULL_DISK = """
import resource, signal, sys
import tinygrad_llm as tl
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
model = tl.GPTModel({"vocab_size": 500, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
                     "drop_rate": 0.0, "qkv_bias": False}, seed=1)
tl.save_checkpoint(sys.argv[1], model)
"""


def test_a_full_disk_during_a_save_is_one_message_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ck.safetensors"
    model = trained_checkpoint(path)
    child = subprocess.run([sys.executable, "-c", SAVE_ON_A_FULL_DISK, str(path)], capture_output=True, text=True)
    assert child.returncode != 0
    last_line = child.stderr.strip().splitlines()[-1]
    assert last_line.startswith("tinygrad_llm.checkpoint.SaveError: cannot write") and str(path) in last_line
    assert "the previous file, if any, is unchanged" in last_line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]  # its temporary file is gone
    loaded = tl.GPTModel(CFG, seed=3)
    tl.load_checkpoint(path, loaded)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[name], value, err_msg=name)


def test_a_temporary_file_left_by_a_killed_save_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "ck.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ck.safetensors.{int(dead.stdout)}-0123456789ab.tmp"  # as a SIGKILLed save leaves it
    stale.write_bytes(b"\0" * 100_000)
    alive = tmp_path / f".ck.safetensors.{os.getpid()}-ba9876543210.tmp"  # a save in progress elsewhere
    alive.write_bytes(b"\0")
    other = tmp_path / f".other.safetensors.{int(dead.stdout)}-0123456789ab.tmp"  # another file's
    other.write_bytes(b"\0")
    trained_checkpoint(path)
    assert not stale.exists() and alive.exists() and other.exists()


# ---- Hugging Face folders -----------------------------------------------------------------------

@pytest.fixture
def hf_folder(tmp_path):
    model = tl.GPTModel({**CFG, "qkv_bias": True, "tie_weights": True}, seed=0)
    return save_hf_gpt2(model, tmp_path / "hf")


def rewrite_tensors(folder, change):
    path = folder / "model.safetensors"
    with safe_open(path, framework="np") as f:
        arrays = {name: f.get_tensor(name) for name in f.keys()}
    change(arrays)
    save_file(arrays, path, metadata={"format": "pt"})


def rewrite_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-50]),
     "model.safetensors is not a safetensors weights file"),
    (lambda d: (d / "config.json").write_text("<html>rate limited</html>"), "config.json is not a JSON config"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json is not a GPT-2 config"),
    (lambda d: rewrite_config(d, lambda c: c.update(n_head=0)), "config.json: n_head must be an integer >= 1, got 0"),
    (lambda d: rewrite_config(d, lambda c: c.update(n_embd=2**40, n_head=1)), "more than this machine's"),
    (lambda d: rewrite_tensors(d, lambda t: t.update({"transformer.wte.weight": t["transformer.wte.weight"].astype(np.int8)})),
     r"tensor 'transformer.wte.weight' has dtype I8; weights must be float"),
    (lambda d: rewrite_tensors(d, nan_at("transformer.h.0.mlp.c_fc.weight")), r"'transformer.h.0.mlp.c_fc.weight' holds nan"),
])
def test_a_damaged_hugging_face_folder_names_the_file(hf_folder, damage, message):
    damage(hf_folder)
    with pytest.raises(ValueError, match=message):
        load_hf_gpt2(hf_folder)


def test_a_pickle_as_pytorch_model_bin_is_refused_in_one_message(hf_folder, tmp_path):
    pytest.importorskip("torch")
    (hf_folder / "model.safetensors").unlink()
    (hf_folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp_path / "payload-ran")))
    with pytest.raises(ValueError, match=r"pytorch_model.bin is not a plain torch weights file, so it was not loaded") as error:
        load_hf_gpt2(hf_folder)
    assert "\n" not in str(error.value)  # one line, not torch's forty
    assert not (tmp_path / "payload-ran").exists()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_hugging_face_weights_are_converted(hf_folder, dtype):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file as save_torch_file

    path = hf_folder / "model.safetensors"
    half = {name: value.to(getattr(torch, dtype)) for name, value in load_file(path).items()}
    save_torch_file(half, path, metadata={"format": "pt"})
    model = load_hf_gpt2(hf_folder)
    assert model.dtype == np.float32
    np.testing.assert_array_equal(model.tok_emb.weight.numpy(), half["transformer.wte.weight"].float().numpy())
    np.testing.assert_array_equal(model.trf_blocks[0].att.W_key.weight.numpy(),
                                  half["transformer.h.0.attn.c_attn.weight"].float().numpy()[:, 16:32].T)


def test_a_book_state_dict_with_integer_or_nan_tensors_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    state = {name: torch.tensor(value) for name, value in tl.GPTModel(CFG, seed=0).state_dict().items()}
    torch.save({**state, "tok_emb.weight": state["tok_emb.weight"].to(torch.int8)}, tmp_path / "int.pth")
    with pytest.raises(ValueError, match=r"int.pth: tensor 'tok_emb.weight' has dtype int8"):
        load_book_state_dict(CFG, tmp_path / "int.pth")
    state["final_norm.shift"][0] = float("inf")
    torch.save(state, tmp_path / "inf.pth")
    with pytest.raises(ValueError, match=r"inf.pth: tensor 'final_norm.shift' holds NaN or infinite values"):
        load_book_state_dict(CFG, tmp_path / "inf.pth")


def test_load_state_dict_refuses_integer_arrays():
    model = tl.GPTModel(CFG, seed=0)
    state = model.state_dict()
    with pytest.raises(TypeError, match="tok_emb.weight has dtype int8: weights must be float"):
        model.load_state_dict({**state, "tok_emb.weight": state["tok_emb.weight"].astype(np.int8)})


# ---- memory -------------------------------------------------------------------------------------

# A child that builds the model, then loads the checkpoint under an RLIMIT_DATA of what it
# already uses plus the room the test allows. RLIMIT_DATA counts private writable memory
# (the heap, NumPy's arrays), not read-only file mappings such as the checkpoint's memory
# map, so it bounds exactly the anonymous memory loading allocates.
MEMORY_CFG = {"vocab_size": 50257, "context_length": 64, "emb_dim": 256, "n_heads": 4, "n_layers": 2,
              "drop_rate": 0.0, "qkv_bias": False}
LOAD_UNDER_A_LIMIT = f"""
import resource, sys
import tinygrad_llm as tl
model = tl.GPTModel({MEMORY_CFG}, init_weights=False)
optimizer = tl.optim.AdamW(model.parameters()) if sys.argv[2] == "with-optimizer" else None
model_bytes = sum(p.data.nbytes for p in model.parameters())
with open("/proc/self/status") as f:
    in_use = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
# the model's own 1x exists already; the optimizer's moments (2x) must be allocated; 0.2x of room
allowed = in_use + (2 * model_bytes if optimizer else 0) + model_bytes // 5
resource.setrlimit(resource.RLIMIT_DATA, (allowed, resource.getrlimit(resource.RLIMIT_DATA)[1]))
tl.load_checkpoint(sys.argv[1], model, optimizer)
print("loaded")
"""


@pytest.fixture(scope="module")
def large_checkpoint(tmp_path_factory):
    """A checkpoint of ~110 MB of float32 weights and AdamW's moments beside them."""
    model = tl.GPTModel(MEMORY_CFG, seed=0)
    adamw = tl.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    adamw.step()
    path = tmp_path_factory.mktemp("memory") / "ck.safetensors"
    tl.save_checkpoint(path, model, adamw)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc are Linux's")
@pytest.mark.parametrize("optimizer", ["weights-only", "with-optimizer"])
def test_loading_a_checkpoint_allocates_under_a_fifth_of_the_model(large_checkpoint, optimizer):
    child = subprocess.run([sys.executable, "-c", LOAD_UNDER_A_LIMIT, str(large_checkpoint), optimizer],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and child.stdout.strip() == "loaded", child.stderr[-2000:]
