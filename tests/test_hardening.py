"""Hostile and careless input at each boundary: one clear error naming the thing, never garbage.

One section per boundary, each with one helper that applies a case and checks the refusal,
so a new case is one more row: config dicts, checkpoint files, Hugging Face folders.
"""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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


SAVE_INTO_A_READ_ONLY_FOLDER = """
import os, sys
import safetensors.numpy
import tinygrad_llm as tl
model = tl.GPTModel({"vocab_size": 30, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
                     "drop_rate": 0.0, "qkv_bias": False}, seed=1)
if os.geteuid() == 0:
    os.setuid(65534)  # root writes anywhere: become nobody, for whom the folder is read-only
try:
    tl.save_checkpoint(sys.argv[1], model)
except OSError as error:
    print(type(error).__name__, error)
"""


def test_a_read_only_folder_is_one_save_error_naming_the_file(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    path = folder / "ck.safetensors"
    model = trained_checkpoint(path)
    folder.chmod(0o555)
    tmp_path.chmod(0o755)
    try:
        child = subprocess.run([sys.executable, "-c", SAVE_INTO_A_READ_ONLY_FOLDER, str(path)],
                               capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
    finally:
        folder.chmod(0o755)
    assert child.stdout.startswith(f"SaveError cannot write {path}: "), child.stdout + child.stderr
    loaded = tl.GPTModel(CFG, seed=3)
    tl.load_checkpoint(path, loaded)
    np.testing.assert_array_equal(loaded.tok_emb.weight.numpy(), model.tok_emb.weight.numpy())


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


# ---- the command line: every case through the CLI in a subprocess ------------------------------

CLI_CFG = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
           "drop_rate": 0.0, "qkv_bias": False}


def run_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "tinygrad_llm", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def assert_refused(result, *named):
    """Exit code != 0, no traceback, and the message names each of `named` (the option, the file)."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for name in named:
        assert str(name) in result.stderr, (name, result.stderr)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A short text, a config file, and a finished one-epoch run trained on the text."""
    from tinygrad_llm import datasets
    from tinygrad_llm.cli import main

    folder = tmp_path_factory.mktemp("cli")
    with open(datasets.path("the-verdict"), encoding="utf-8") as f:
        (folder / "text.txt").write_text(f.read()[:2000], encoding="utf-8")
    (folder / "tiny.json").write_text(json.dumps(CLI_CFG))
    assert main(["pretrain", "--data", str(folder / "text.txt"), "--config", str(folder / "tiny.json"), "--epochs", "1",
                 "--batch-size", "4", "--eval-iter", "1", "--no-progress", "--out", str(folder / "run")]) == 0
    return folder


def pretrain(files, *extra):
    return ["pretrain", "--data", files / "text.txt", "--config", files / "tiny.json", "--no-progress", *extra]


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "-1", "value must be > 0.0, got -1.0"),
    ("--lr", "abc", "expected a number, got 'abc'"),
    ("--grad-clip", "0", "value must be > 0.0, got 0.0"),
    ("--grad-clip", "-1", "value must be > 0.0"),
    ("--grad-clip", "nan", "value must be a finite number > 0.0, got nan"),
    ("--warmup", "-5", "value must be an integer >= 0, got -5"),
    ("--train-ratio", "-0.5", "value must be > 0.0 and < 1.0, got -0.5"),
    ("--train-ratio", "1", "value must be > 0.0 and < 1.0, got 1.0"),
    ("--epochs", "0", "value must be an integer >= 1, got 0"),
    ("--eval-freq", "0", "value must be an integer >= 1, got 0"),
    ("--eval-iter", "0", "value must be an integer >= 1"),
    ("--batch-size", "2.5", "expected an integer, got '2.5'"),
    ("--seed", "-1", "value must be an integer >= 0"),
    ("--save-every", "0", "value must be an integer >= 1"),
    ("--device", "tpu", "unknown device 'tpu'"),
])
def test_pretrain_refuses_a_bad_option_value_naming_it(cli_files, tmp_path, option, value, message):
    assert_refused(run_cli(*pretrain(cli_files, "--out", tmp_path / "run", option, value)), f"argument {option}", message)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_pretrain_refuses_a_folder_that_holds_a_run_without_resume_or_overwrite(cli_files):
    checkpoint = cli_files / "run" / "checkpoint.safetensors"
    before = checkpoint.read_bytes()
    assert_refused(run_cli(*pretrain(cli_files, "--out", cli_files / "run")), checkpoint, "--resume", "--overwrite")
    assert checkpoint.read_bytes() == before


def test_pretrain_overwrite_starts_a_new_run(cli_files, tmp_path):
    import shutil

    shutil.copytree(cli_files / "run", tmp_path / "run")
    result = run_cli(*pretrain(cli_files, "--out", tmp_path / "run", "--overwrite", "--epochs", "1", "--batch-size", "4",
                               "--eval-iter", "1", "--seed", "7"))
    assert result.returncode == 0, result.stderr
    assert read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["metadata"]["run"]["seed"] == 7


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "out").write_text("a file"), "is a file, not a folder"),
])
def test_pretrain_checks_out_before_training(cli_files, tmp_path, make, message):
    make(tmp_path)
    assert_refused(run_cli(*pretrain(cli_files, "--out", tmp_path / "out")), "--out", tmp_path / "out", message)


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary", "is not UTF-8 text"),
])
def test_pretrain_refuses_binary_data(cli_files, tmp_path, content, message):
    (tmp_path / "data.bin").write_bytes(content)
    result = run_cli("pretrain", "--data", tmp_path / "data.bin", "--config", cli_files / "tiny.json",
                     "--out", tmp_path / "run")
    assert_refused(result, tmp_path / "data.bin", message)


@pytest.mark.parametrize("config, message", [
    ({k: v for k, v in CLI_CFG.items() if k != "n_layers"}, "is missing ['n_layers']"),
    ({**CLI_CFG, "n_layers": -1}, "n_layers must be an integer >= 1, got -1"),
    ({**CLI_CFG, "emb_dim": 2**40, "n_heads": 1}, "more than this machine's"),
])
def test_pretrain_refuses_a_bad_config_file_naming_it(cli_files, tmp_path, config, message):
    (tmp_path / "bad.json").write_text(json.dumps(config))
    result = run_cli("pretrain", "--data", cli_files / "text.txt", "--config", tmp_path / "bad.json",
                     "--out", tmp_path / "run")
    assert_refused(result, tmp_path / "bad.json", message)


def test_resume_refuses_changed_data_unless_told(cli_files, tmp_path):
    import shutil

    shutil.copytree(cli_files / "run", tmp_path / "run")
    (tmp_path / "other.txt").write_text((cli_files / "text.txt").read_text() + " and more", encoding="utf-8")
    resume = ["pretrain", "--out", tmp_path / "run", "--resume", "--no-progress", "--data", tmp_path / "other.txt"]
    assert_refused(run_cli(*resume), "--data", "differs from the data this run began on", "--data-changed")
    result = run_cli(*resume, "--data-changed")
    assert result.returncode == 0, result.stderr
    # the same text under another name is the same data
    shutil.copy(cli_files / "text.txt", tmp_path / "moved.txt")
    shutil.copytree(cli_files / "run", tmp_path / "run2")
    result = run_cli("pretrain", "--out", tmp_path / "run2", "--resume", "--no-progress", "--data", tmp_path / "moved.txt")
    assert result.returncode == 0, result.stderr


def test_resume_never_opens_a_file_named_only_by_the_checkpoint(cli_files, tmp_path):
    import shutil

    shutil.copytree(cli_files / "run", tmp_path / "run")
    secret = tmp_path / "secret.txt"
    secret.write_text("private " * 500)
    tamper(tmp_path / "run" / "checkpoint.safetensors",
           header=set_json("metadata", lambda m: m["run"].update(data=str(secret))))
    result = run_cli("pretrain", "--out", tmp_path / "run", "--resume", "--no-progress")
    assert_refused(result, "--data", str(secret), "never makes pretrain open a file you did not name")


@pytest.mark.parametrize("setting, value, message", [
    ("lr", -1.0, "lr = -1.0"),
    ("eval_freq", 0, "eval_freq = 0"),
    ("config", {**CLI_CFG, "n_layers": 0}, "run config: n_layers must be an integer >= 1"),
])
def test_resume_refuses_tampered_run_settings(cli_files, tmp_path, setting, value, message):
    import shutil

    shutil.copytree(cli_files / "run", tmp_path / "run")
    tamper(tmp_path / "run" / "checkpoint.safetensors",
           header=set_json("metadata", lambda m: m["run"].update({setting: value})))
    result = run_cli("pretrain", "--out", tmp_path / "run", "--resume", "--data", cli_files / "text.txt")
    assert_refused(result, "checkpoint.safetensors", message)


def test_resume_refuses_a_tampered_position(cli_files, tmp_path):
    import shutil

    shutil.copytree(cli_files / "run", tmp_path / "run")
    tamper(tmp_path / "run" / "checkpoint.safetensors",
           header=set_json("metadata", lambda m: m["train_state"].update(epoch=-3)))
    result = run_cli("pretrain", "--out", tmp_path / "run", "--resume", "--data", cli_files / "text.txt")
    assert_refused(result, "checkpoint.safetensors", "train_state epoch must be an integer >= 0, got -3")
    assert_refused(run_cli("info", "--checkpoint", tmp_path / "run" / "checkpoint.safetensors"), "train_state epoch")


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "nan", "value must be a finite number >= 0.0, got nan"),
    ("--temperature", "-1", "value must be >= 0.0"),
    ("--top-p", "0", "value must be > 0.0 and <= 1.0, got 0.0"),
    ("--top-p", "1.5", "value must be > 0.0 and <= 1.0"),
    ("--top-k", "0", "value must be an integer >= 1"),
    ("--max-new-tokens", "-1", "value must be an integer >= 0"),
    ("--max-new-tokens", "ten", "expected an integer, got 'ten'"),
])
def test_generate_refuses_a_bad_option_value_naming_it(cli_files, option, value, message):
    result = run_cli("generate", "--checkpoint", cli_files / "run" / "checkpoint.safetensors", option, value)
    assert_refused(result, f"argument {option}", message)


# What each command needs besides the option under test; {checkpoint} is a finished run's
# checkpoint, {file} a file that exists, {missing} a file that does not, {out} a folder that
# must not appear (nothing may be written before the options are checked).
REQUIRED_OPTIONS = {
    "chat": ["--checkpoint", "{checkpoint}"],
    "evaluate": ["--responses", "{file}"],
    "finetune instruct": ["--out", "{out}"],
    "finetune classify": ["--model", "{checkpoint}", "--out", "{out}"],
    "finetune dpo": ["--model", "{checkpoint}", "--out", "{out}"],
    "finetune reward": ["--model", "{checkpoint}", "--out", "{out}"],
    "finetune ppo": ["--model", "{checkpoint}", "--out", "{out}", "--reward-tokens", "yes"],
    "grade": ["{file}"],
    "prepare": ["--data", "{file}", "--out", "{out}"],
    "exercises": ["--stub", "bpe_merge"],
}


@pytest.mark.parametrize("command, option, value, message", [
    ("chat", "--temperature", "nan", "value must be a finite number >= 0.0, got nan"),
    ("chat", "--top-k", "0", "value must be an integer >= 1"),
    ("chat", "--max-new-tokens", "0", "value must be an integer >= 1"),
    ("chat", "--device", "tpu", "unknown device 'tpu'"),
    ("finetune instruct", "--lr", "-1", "value must be > 0.0, got -1.0"),
    ("finetune instruct", "--epochs", "-1", "value must be an integer >= 0"),
    ("finetune instruct", "--drop-rate", "1", "value must be >= 0.0 and < 1.0, got 1.0"),
    ("finetune instruct", "--lora-rank", "0", "value must be an integer >= 1"),
    ("finetune instruct", "--max-new-tokens", "0", "value must be an integer >= 1, got 0"),
    ("finetune instruct", "--out", "{file}", "is a file, not a folder"),
    ("evaluate", "--judge-timeout", "0", "value must be > 0.0, got 0.0"),
    ("evaluate", "--responses", "{missing}", "missing.tsv does not exist"),
    ("evaluate", "--checkpoint", "{missing}", "missing.tsv does not exist"),
    ("evaluate", "--json", "{folder}", "is a folder, not a file"),
    ("finetune classify", "--epochs", "0", "value must be an integer >= 1, got 0"),
    ("finetune classify", "--lr", "nan", "value must be a finite number > 0.0, got nan"),
    ("finetune classify", "--weight-decay", "-0.1", "value must be >= 0.0, got -0.1"),
    ("finetune classify", "--batch-size", "0", "value must be an integer >= 1, got 0"),
    ("finetune classify", "--accumulation-steps", "0", "value must be an integer >= 1, got 0"),
    ("finetune classify", "--max-length", "0", "value must be an integer >= 1, got 0"),
    ("finetune classify", "--eval-freq", "0", "value must be an integer >= 1, got 0"),
    ("finetune classify", "--eval-iter", "0", "value must be an integer >= 1, got 0"),
    ("finetune classify", "--lora-rank", "0", "value must be an integer >= 1, got 0"),
    ("finetune classify", "--lora-alpha", "0", "value must be > 0.0, got 0.0"),
    ("finetune classify", "--seed", "-1", "value must be an integer >= 0, got -1"),
    ("finetune classify", "--data", "{missing}", "missing.tsv does not exist"),
    ("finetune classify", "--out", "{file}", "is a file, not a folder"),
    ("finetune dpo", "--beta", "nan", "value must be a finite number > 0.0, got nan"),
    ("finetune dpo", "--epochs", "0", "value must be an integer >= 1, got 0"),
    ("finetune dpo", "--batch-size", "0", "value must be an integer >= 1, got 0"),
    ("finetune dpo", "--lr", "-1", "value must be > 0.0, got -1.0"),
    ("finetune dpo", "--weight-decay", "-1", "value must be >= 0.0, got -1.0"),
    ("finetune dpo", "--eval-freq", "0", "value must be an integer >= 1, got 0"),
    ("finetune dpo", "--eval-iter", "0", "value must be an integer >= 1, got 0"),
    ("finetune dpo", "--max-steps", "0", "value must be an integer >= 1, got 0"),
    ("finetune dpo", "--seed", "-1", "value must be an integer >= 0, got -1"),
    ("finetune dpo", "--data", "{missing}", "missing.tsv does not exist"),
    ("finetune dpo", "--out", "{file}", "is a file, not a folder"),
    ("finetune reward", "--lr", "0", "value must be > 0.0, got 0.0"),
    ("finetune reward", "--epochs", "0", "value must be an integer >= 1, got 0"),
    ("finetune ppo", "--steps", "0", "value must be an integer >= 1, got 0"),
    ("finetune ppo", "--batch-size", "0", "value must be an integer >= 1, got 0"),
    ("finetune ppo", "--response-length", "0", "value must be an integer >= 1, got 0"),
    ("finetune ppo", "--lr", "0", "value must be > 0.0, got 0.0"),
    ("finetune ppo", "--kl-coef", "-0.1", "value must be >= 0.0, got -0.1"),
    ("finetune ppo", "--target-kl", "0", "value must be > 0.0, got 0.0"),
    ("finetune ppo", "--ppo-epochs", "0", "value must be an integer >= 1, got 0"),
    ("finetune ppo", "--reward-tokens", "", "a text whose tokens the toy reward counts"),
    ("finetune ppo", "--reward-model", "{missing}", "missing.tsv does not exist"),
    ("grade", "--timeout", "0", "value must be > 0.0 and <= 86400.0, got 0.0"),
    ("grade", "--timeout", "1e20", "value must be > 0.0 and <= 86400.0, got 1e+20"),
    ("grade", "--memory", "512", "value must be an integer >= 1024 and <= 16777216, got 512"),
    ("grade", "--max-examples", "0", "value must be an integer >= 1, got 0"),
    ("grade", "--jobs", "0", "value must be an integer >= 1, got 0"),
    ("grade", "--seed", "-1", "value must be an integer >= 0, got -1"),
    ("grade", "--weight", "softmax_backward=-1", "the points of softmax_backward must be > 0.0, got -1.0"),
    ("grade", "--weight", "softmax_backward", "expected NAME=POINTS, such as softmax_backward=2"),
    ("grade", "--json", "{folder}", "is a folder, not a file"),
    ("prepare", "--shard-tokens", "1.5", "expected an integer, got '1.5'"),
    ("prepare", "--processes", "0", "value must be an integer >= 1, got 0"),
    ("prepare", "--data", "{missing}", "missing.tsv does not exist"),
    ("prepare", "--out", "{file}", "is a file, not a folder"),
    ("exercises", "--out", "{folder}", "is a folder, not a file"),
])
def test_a_bad_option_value_is_refused_before_any_work(cli_files, tmp_path, command, option, value, message):
    places = {"checkpoint": cli_files / "run" / "checkpoint.safetensors", "file": cli_files / "text.txt",
              "missing": tmp_path / "missing.tsv", "out": tmp_path / "run", "folder": tmp_path}
    args = [arg.format(**places) for arg in (*command.split(), *REQUIRED_OPTIONS[command], option, value)]
    assert_refused(run_cli(*args), f"argument {option}", message.format(**places))
    assert not (tmp_path / "run").exists()


def test_chat_names_a_missing_checkpoint(tmp_path):
    assert_refused(run_cli("chat", "--checkpoint", tmp_path / "missing.safetensors"), "missing.safetensors")


@pytest.mark.parametrize("command", ["generate", "info", "classify"])
def test_a_missing_checkpoint_is_named_at_once(tmp_path, command):
    assert_refused(run_cli(command, "--checkpoint", tmp_path / "nothing.safetensors"), "--checkpoint",
                   tmp_path / "nothing.safetensors", "does not exist")


def test_a_checkpoint_with_nan_weights_is_refused_before_generating(cli_files, tmp_path):
    path = tmp_path / "nan.safetensors"
    path.write_bytes((cli_files / "run" / "checkpoint.safetensors").read_bytes())
    tamper(path, nan_at("model.trf_blocks.0.att.W_query.weight"))
    result = run_cli("generate", "--checkpoint", path)
    assert_refused(result, path, "'trf_blocks.0.att.W_query.weight' holds nan")
    assert result.stdout == ""


def test_import_gpt2_refuses_integer_weights_and_writes_nothing(tmp_path, hf_folder):
    rewrite_tensors(hf_folder, lambda t: t.update({"transformer.wte.weight": t["transformer.wte.weight"].astype(np.int8)}))
    result = run_cli("import-gpt2", "--from", hf_folder, "--out", tmp_path / "gpt2.safetensors")
    assert_refused(result, "model.safetensors", "'transformer.wte.weight' has dtype I8")
    assert not (tmp_path / "gpt2.safetensors").exists()


def test_import_gpt2_out_must_be_a_file(tmp_path, hf_folder):
    assert_refused(run_cli("import-gpt2", "--from", hf_folder, "--out", tmp_path), "--out", "is a folder, not a file")


def test_device_cuda_without_cupy_is_one_message(cli_files, tmp_path):
    pytest.importorskip("numpy")
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    for args in (pretrain(cli_files, "--out", tmp_path / "run", "--device", "cuda"),
                 ["generate", "--checkpoint", cli_files / "run" / "checkpoint.safetensors", "--device", "cuda:0"]):
        assert_refused(run_cli(*args), "argument --device", "needs CuPy")
    assert_refused(run_cli("generate", "--checkpoint", cli_files / "run" / "checkpoint.safetensors",
                           TINYGRAD_LLM_DEVICE="cuda"), "--device", "needs CuPy")


def test_generate_into_a_closed_pipe_stops_quietly(cli_files):
    child = subprocess.Popen([sys.executable, "-m", "tinygrad_llm", "generate", "--checkpoint",
                              str(cli_files / "run" / "checkpoint.safetensors"), "--max-new-tokens", "1000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.read(10)  # as `| head -c 10` does, then the reader goes away
    child.stdout.close()
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=300) == 141  # 128 + SIGPIPE, what a shell shows for a closed pipe
    assert stderr == ""


# ---- devices as the book passes them ------------------------------------------------------------

class TorchLikeDevice:
    """What the library reads of a torch.device: .type and .index (torch itself is not needed)."""

    def __init__(self, type, index=None):
        self.type, self.index = type, index

    def __repr__(self):
        return f"device(type={self.type!r}, index={self.index})"


@pytest.mark.parametrize("device", ["cpu", "cpu:0", TorchLikeDevice("cpu"), TorchLikeDevice("cpu", 0)])
def test_a_torch_device_or_an_indexed_name_is_accepted_wherever_a_device_is(device):
    from tinygrad_llm.train import calc_loss_batch

    model = tl.GPTModel(CFG, seed=0).to(device=device)
    assert model.device == "cpu" and tl.Tensor(np.ones(2), device=device).device == "cpu"
    assert np.isfinite(calc_loss_batch(IDS, IDS, model, device).item())
    assert tl.backend.check_device(device) == "cpu"


def test_the_real_torch_device_and_cuda_0_are_understood():
    torch = pytest.importorskip("torch")
    assert tl.backend.check_device(torch.device("cpu")) == "cpu"
    assert tl.backend.check_device(torch.device("cuda", 0)) == "cuda"
    assert tl.backend.check_device("cuda:0") == "cuda"
    for bad in ("cuda:1", "gpu", TorchLikeDevice("mps"), None):
        with pytest.raises(ValueError, match="unknown device"):
            tl.backend.check_device(bad)


# ---- the Python API: numbers from outside -------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    return tl.GPTModel(CFG, seed=0).eval()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=None), "max_new_tokens must be an integer, got None"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer, got 2.0"),
    (dict(temperature=float("nan")), "temperature .* must be a finite number >= 0.0, got nan"),
    (dict(temperature=float("inf")), "temperature .* must be a finite number"),
    (dict(top_k=2.5), "top_k .* must be an integer"),
    (dict(top_p=float("nan")), "top_p .* must be a finite number"),
    (dict(context_size=4.0), "context_size .* must be an integer, got 4.0"),
    (dict(idx=np.zeros((0, 3), np.int64)), r"at least one sequence of at least one token, got shape \(0, 3\)"),
])
def test_generate_refuses_a_bad_argument_naming_it(small_model, kwargs, message):
    args = {"idx": IDS, "max_new_tokens": 3, "context_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        tl.generate(small_model, args.pop("idx"), **args)


def test_a_tiny_temperature_is_the_greedy_limit_not_token_zero(small_model):
    greedy = tl.generate(small_model, IDS, 5, 8)
    for temperature in (1e-320, 1e-300, 5e-324):
        np.testing.assert_array_equal(tl.generate(small_model, IDS, 5, 8, temperature=temperature, seed=1), greedy)


def test_nan_logits_stop_generation_with_a_message():
    model = tl.GPTModel(CFG, seed=0).eval()
    model.final_norm.shift.data[0] = np.nan  # as weights overflowed in memory, past the loaders' checks
    with pytest.raises(ValueError, match="the model's logits are NaN"):
        tl.generate(model, IDS, 3, 8, temperature=1.0)


@pytest.mark.parametrize("batch", [np.zeros((0, 4), np.int64), np.zeros((2, 0), np.int64)])
def test_the_model_refuses_an_empty_batch(small_model, batch):
    with pytest.raises(ValueError, match="empty batch of token ids"):
        small_model(batch)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stride=2.5), "stride must be an integer, got 2.5"),
    (dict(max_length=4.0), "max_length must be an integer, got 4.0"),
    (dict(max_length=0), "max_length must be an integer >= 1, got 0"),
    (dict(batch_size=1.5), "batch_size must be a whole number"),
])
def test_the_book_loader_refuses_float_or_zero_sizes(kwargs, message):
    from tinygrad_llm.data import create_dataloader_v1

    args = {"batch_size": 2, "max_length": 4, "stride": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        create_dataloader_v1("Every effort moves you forward, and the text goes on for a while here.", **args)


# ---- downloaded files ---------------------------------------------------------------------------

def test_a_server_that_trickles_bytes_meets_the_overall_deadline(tmp_path):
    import time

    from tests.http_server import serve
    from tinygrad_llm.datasets import DownloadError, download_file

    with serve({"/slow.bin": b"x" * 1000}) as server:
        server.drip_seconds = 0.05  # a byte every 50 ms: never silent for the read timeout
        started = time.monotonic()
        with pytest.raises(DownloadError, match="took longer than its deadline of 1 s after .* of 1000 bytes"):
            download_file(server.url("/slow.bin"), tmp_path / "slow.bin", progress=False, deadline=1, read_timeout=5)
        assert time.monotonic() - started < 4
    assert not (tmp_path / "slow.bin").exists() and (tmp_path / "slow.bin.part").exists()  # kept to resume


def test_a_server_that_never_answers_is_one_download_error(tmp_path):
    import socket

    from tinygrad_llm.datasets import DownloadError, download_file

    with socket.socket() as listener:  # accepts connections (the backlog) and never says a word
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/file"
        with pytest.raises(DownloadError, match=r"download of .*/file failed: no answer for 0.5 s"):
            download_file(url, tmp_path / "file", progress=False, read_timeout=0.5)
    assert list(tmp_path.iterdir()) == []


DOWNLOAD_ON_A_FULL_DISK = """
import resource, signal, sys
from tinygrad_llm.datasets import download_file
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
try:
    download_file(sys.argv[1], sys.argv[2], progress=False)
except OSError as error:
    print(error)
"""


def test_a_full_disk_during_a_download_deletes_the_part_file(tmp_path):
    from tests.http_server import serve

    with serve({"/big.bin": b"x" * 300_000}) as server:
        child = subprocess.run([sys.executable, "-c", DOWNLOAD_ON_A_FULL_DISK, server.url("/big.bin"),
                                str(tmp_path / "big.bin")], capture_output=True, text=True, timeout=120)
    assert f"cannot write {tmp_path / 'big.bin.part'}" in child.stdout, child.stderr
    assert "the partial download was deleted" in child.stdout
    assert list(tmp_path.iterdir()) == []


DOWNLOAD_INTO_A_READ_ONLY_FOLDER = """
import os, sys
from tinygrad_llm.datasets import download_file
if os.geteuid() == 0:
    os.setuid(65534)  # root writes anywhere: become nobody, for whom the folder is read-only
try:
    download_file(sys.argv[1], sys.argv[2], sha256=sys.argv[3], progress=False)
except OSError as error:
    print(type(error).__name__, error)
"""


@pytest.mark.parametrize("dest, folder", [
    ("file.bin", "read-only"),                 # a new file in the folder
    ("models/file.bin", "read-only/models"),   # a subfolder that cannot be created
    ("damaged.bin", "read-only"),              # a damaged copy that cannot be replaced
])
def test_a_download_into_a_read_only_folder_names_the_folder_and_writes_nothing(dest, folder):
    from tests.http_server import serve

    # Under /tmp itself: pytest's own folders are closed to other users, and the child may be nobody.
    tmp_path = Path(tempfile.mkdtemp(prefix="read-only-download-"))
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    (read_only / "damaged.bin").write_bytes(b"<html>not the file</html>")
    before = sorted(read_only.rglob("*"))
    data = b"x" * 1000
    read_only.chmod(0o555)
    tmp_path.chmod(0o755)
    try:
        with serve({"/file.bin": data}) as server:
            child = subprocess.run([sys.executable, "-c", DOWNLOAD_INTO_A_READ_ONLY_FOLDER, server.url("/file.bin"),
                                    str(read_only / dest), hashlib.sha256(data).hexdigest()],
                                   capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
            assert server.requests == []  # refused before connecting
    finally:
        read_only.chmod(0o755)
        listing = sorted(read_only.rglob("*"))
        shutil.rmtree(tmp_path)
    message = child.stdout + child.stderr
    assert message.startswith("PermissionError [Errno 13] cannot download "), message
    assert f"into {tmp_path / folder}: the folder is not writable" in message, message
    assert "nothing was written" in message and "Traceback" not in message
    assert listing == before  # no .part, and the damaged copy left as it was


@pytest.fixture
def gpt2_hub(tmp_path):
    """A small GPT-2 as the hub serves it for "124M": {url path: bytes}."""
    folder = save_hf_gpt2(tl.GPTModel({**CFG, "qkv_bias": True, "tie_weights": True}, seed=0), tmp_path / "hub")
    hub = "/openai-community/gpt2/resolve/main"
    return {f"{hub}/{name}": (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}


def test_a_cached_html_page_as_config_json_is_downloaded_again(gpt2_hub, tmp_path):
    from tests.http_server import serve
    from tinygrad_llm.weights import download_gpt2

    with serve(gpt2_hub) as server:
        folder = download_gpt2("124M", tmp_path / "models", base_url=server.url(""), progress=False)
        (folder / "config.json").write_text("<html><body>Too many requests</body></html>")  # saved once, long ago
        assert download_gpt2("124M", tmp_path / "models", base_url=server.url(""), progress=False) == folder
        assert [path for path, _ in server.requests].count("/openai-community/gpt2/resolve/main/config.json") == 2
    assert json.loads((folder / "config.json").read_text())["n_embd"] == 16
    load_hf_gpt2(folder)


def test_an_html_page_served_as_config_json_is_refused_naming_it(gpt2_hub, tmp_path):
    from tests.http_server import serve
    from tinygrad_llm.weights import download_gpt2

    hub = {**gpt2_hub, "/openai-community/gpt2/resolve/main/config.json": b"<html>Too many requests</html>"}
    with serve(hub) as server:
        with pytest.raises(ValueError, match=r"config.json did not send what was expected \(.*config.json.part is not a JSON config"):
            download_gpt2("124M", tmp_path / "models", base_url=server.url(""), progress=False)
    assert list((tmp_path / "models" / "124M").iterdir()) == []


def test_a_corrupt_zip_is_refused_naming_it_and_nothing_stays(tmp_path, monkeypatch):
    import dataclasses

    from tests.http_server import serve
    from tinygrad_llm import datasets

    monkeypatch.delenv("TINYGRAD_LLM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with serve({"/sms.zip": b"PK\x03\x04 this is no zip archive at all"}) as server:
        entry = datasets.get("sms-spam-collection")
        monkeypatch.setitem(datasets.REGISTRY, entry.name, dataclasses.replace(entry, url=server.url("/sms.zip")))
        with pytest.raises(ValueError, match=r"/sms.zip did not send what was expected \(not a zip archive"):
            datasets.path("sms-spam-collection", progress=False)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_a_damaged_cached_data_set_is_downloaded_again(tmp_path, monkeypatch):
    import dataclasses

    from tests.http_server import serve
    from tinygrad_llm import datasets

    verdict = datasets.path("the-verdict").read_bytes()
    monkeypatch.delenv("TINYGRAD_LLM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "tinygrad_llm" / "the-verdict.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"<html>a captive portal's login page</html>")
    with serve({"/the-verdict.txt": verdict}) as server:
        entry = datasets.get("the-verdict")
        monkeypatch.setitem(datasets.REGISTRY, entry.name, dataclasses.replace(entry, url=server.url("/the-verdict.txt")))
        assert datasets.path("the-verdict", progress=False) == cached
    assert cached.read_bytes() == verdict


def test_a_wrong_file_in_the_data_folder_is_refused_naming_it(tmp_path, monkeypatch):
    from tinygrad_llm import datasets

    (tmp_path / "the-verdict.txt").write_text("not the story")
    monkeypatch.setenv("TINYGRAD_LLM_DATA", str(tmp_path))
    with pytest.raises(ValueError, match=f"{tmp_path / 'the-verdict.txt'} is not the data set 'the-verdict'"):
        datasets.path("the-verdict")
    assert (tmp_path / "the-verdict.txt").read_text() == "not the story"  # the user's file is left alone


@pytest.mark.parametrize("command", [["finetune", "classify"], ["finetune", "dpo"], ["finetune", "ppo"], ["classify"]])
def test_every_subcommand_checks_its_device(command):
    assert_refused(run_cli(*command, "--device", "cuda:3"), "argument --device", "unknown device 'cuda:3'")


@pytest.mark.parametrize("make, message", [
    (lambda ps: tl.optim.AdamW(ps, lr=-1e-3), "AdamW lr must be >= 0.0, got -0.001"),
    (lambda ps: tl.optim.AdamW(ps, lr=float("nan")), "AdamW lr must be a finite number"),
    (lambda ps: tl.optim.AdamW(ps, betas=(0.9, 1.0)), r"AdamW betas must be >= 0.0 and < 1.0, got 1.0"),
    (lambda ps: tl.optim.AdamW(ps, eps=-1.0), "AdamW eps must be >= 0.0"),
    (lambda ps: tl.optim.AdamW([{"params": ps, "weight_decay": -0.1}]), "AdamW weight_decay must be >= 0.0"),
    (lambda ps: tl.optim.SGD(ps, lr=0.1, momentum=-0.5), "SGD momentum must be >= 0.0"),
    (lambda ps: tl.optim.clip_grad_norm_(ps, float("nan")), "max_norm must be a number >= 0"),
    (lambda ps: tl.optim.clip_grad_norm_(ps, -1.0), "max_norm must be a number >= 0"),
])
def test_optimizer_settings_are_checked(make, message):
    with pytest.raises(ValueError, match=message):
        make(tl.GPTModel(CFG, seed=0).parameters())


def test_calc_loss_loader_refuses_zero_batches():
    from tinygrad_llm.train import calc_loss_loader

    with pytest.raises(ValueError, match="num_batches must be an integer >= 1, got 0"):
        calc_loss_loader([(IDS, IDS)], tl.GPTModel(CFG, seed=0), None, num_batches=0)
