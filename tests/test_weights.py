"""GPT-2 weights against transformers: import, export, the book's formats and the download.

Every model here is built from a small config with random weights, so nothing needs the
network; transformers is told to stay offline before it is imported.
"""
import copy
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

import tinygrad_llm as tl
from tests.http_server import serve
from tinygrad_llm.checkpoint import model_from_checkpoint
from tinygrad_llm.cli import main
from tinygrad_llm.model import gpt2_config, parameter_counts
from tinygrad_llm.weights import (
    book_config, download_and_load_gpt2, download_gpt2, load_book_state_dict, load_hf_gpt2,
    load_weights_into_gpt, save_hf_gpt2,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Logits are compared by the largest |difference| over the largest |logit|.
# float64: 1e-12; the worst of 200 small configs measured 4e-14.
# float32: 1e-5, plus twice transformers' own float32 error against a float64 run of the
# same weights. A LayerNorm over a few features amplifies rounding wherever a row's values
# nearly cancel (n_embd=2 reaches 2e-5, in transformers as in ours), and transformers' own
# error measures that amplification for the weights at hand.
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def relative_error(ours, reference):
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def torch_logits(model, idx):
    with torch.no_grad():
        out = model(torch.tensor(idx))
    return getattr(out, "logits", out).numpy()  # transformers wraps its logits, the book's model does not


def our_logits(model, idx):
    with tl.no_grad():
        return model(idx).numpy()


def assert_logits_match(ours, reference, idx):
    """GPTModel `ours` computes the logits of torch model `reference` on `idx`, to its dtype's tolerance."""
    expected = torch_logits(reference, idx)
    tolerance = TOLERANCE[str(ours.dtype)]
    if ours.dtype == np.float32:
        tolerance += 2 * relative_error(expected, torch_logits(copy.deepcopy(reference).double(), idx))
    assert relative_error(our_logits(ours, idx), expected) < tolerance


def hf_gpt2(config, dtype="float32", seed=0):
    """A GPT2LMHeadModel with every parameter moved away from its initial value.

    At initialisation biases are 0 and LayerNorm scales 1, so a bias loaded into the wrong
    place, or a scale swapped with a shift, would go unnoticed; the noise makes each tensor count.
    """
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).to(TORCH_DTYPES[dtype]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def small_config(**overrides):
    defaults = dict(n_layer=2, n_head=2, n_embd=8, vocab_size=50, n_positions=16, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2Config(**{**defaults, **overrides})


def token_ids(config, seed=0):
    # Full context, so every position embedding takes part.
    return np.random.default_rng(seed).integers(0, config.vocab_size, (2, config.n_positions))


@st.composite
def gpt2_configs(draw):
    n_head = draw(st.integers(1, 4))
    return small_config(
        n_layer=draw(st.integers(1, 3)),
        n_head=n_head,
        n_embd=n_head * draw(st.integers(1, 8)),
        vocab_size=draw(st.integers(2, 1000)),
        n_positions=draw(st.integers(4, 64)),
        layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-3])),
        tie_word_embeddings=draw(st.booleans()),
    )


@settings(max_examples=25, deadline=None)
@given(config=gpt2_configs(), dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**16))
def test_import_and_export_match_transformers(config, dtype, seed):
    reference = hf_gpt2(config, dtype, seed)
    idx = token_ids(config, seed)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(f"{folder}/hf")
        model = load_hf_gpt2(f"{folder}/hf", dtype=dtype)
        assert model.dtype == np.dtype(dtype) and not model.training
        assert_logits_match(model, reference, idx)

        save_hf_gpt2(model, f"{folder}/ours")
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(f"{folder}/ours", dtype=TORCH_DTYPES[dtype]).eval()
    # Export moves values without arithmetic, so transformers gets its own weights back exactly.
    for name, value in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    assert reloaded.config.layer_norm_epsilon == config.layer_norm_epsilon
    # Same weights, yet the reloaded model may pick another attention kernel: last-bit differences.
    assert relative_error(torch_logits(reloaded, idx), torch_logits(reference, idx)) < TOLERANCE[dtype]


def test_openai_layout_without_prefix_with_mask_buffers(tmp_path):
    # OpenAI's files on the hub name tensors without "transformer." and carry the causal masks.
    config = small_config()
    reference = hf_gpt2(config)
    reference.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "np") as f:
        tensors = {name.removeprefix("transformer."): f.get_tensor(name) for name in f.keys()}
    for layer in range(config.n_layer):
        tensors[f"h.{layer}.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
        tensors[f"h.{layer}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_hf_gpt2(tmp_path / "model.safetensors")  # a file beside its config.json works too
    assert_logits_match(model, reference, token_ids(config))


def test_pytorch_model_bin(tmp_path):
    config = small_config()
    reference = hf_gpt2(config)
    config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    assert_logits_match(load_hf_gpt2(tmp_path), reference, token_ids(config))


def save_tensors(folder, change):
    """A small GPT-2 folder whose tensors went through `change(dict)` before saving."""
    config = small_config()
    config.save_pretrained(folder)
    tensors = {f"transformer.{k}": v.numpy() for k, v in hf_gpt2(config).transformer.state_dict().items()}
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"transformer.h.1.attn.c_attn.weight": np.zeros((8, 16), np.float32)}),
     r"'transformer.h.1.attn.c_attn.weight' has shape \(8, 16\), expected \(8, 24\)"),
    (lambda t: t.update({"transformer.wpe.weight": np.zeros((17, 8), np.float32)}),
     r"'transformer.wpe.weight' has shape \(17, 8\), expected \(16, 8\)"),
    (lambda t: t.pop("transformer.h.0.mlp.c_proj.bias"), r"no tensor for parameter\(s\) trf_blocks.0.ff.layers.2.bias"),
    (lambda t: t.update({"transformer.h.2.ln_1.weight": np.ones(8, np.float32)}),
     r"'transformer.h.2.ln_1.weight' has no place in this model, which has no parameter 'trf_blocks.2.norm1.scale' \(2 layers"),
    (lambda t: t.update({"transformer.h.0.attn.rotary.weight": np.ones(8, np.float32)}),
     r"unexpected tensor 'transformer.h.0.attn.rotary.weight'"),
])
def test_bad_tensors_are_named(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_hf_gpt2(save_tensors(tmp_path, change))


@pytest.mark.parametrize("key, value", [("activation_function", "relu"), ("n_inner", 48),
                                        ("scale_attn_by_inverse_layer_idx", True)])
def test_config_settings_the_model_lacks_are_refused(key, value):
    # Computing these differently without a word would give wrong logits.
    with pytest.raises(ValueError, match=f"{key}={value!r} is not supported"):
        book_config(small_config(**{key: value}).to_dict())


PUBLISHED_SIZES = {"124M": 124_439_808, "355M": 354_823_168, "774M": 774_030_080, "1558M": 1_557_611_200}


@pytest.mark.parametrize("size", PUBLISHED_SIZES)
def test_preset_parameter_counts_match_gpt2(size):
    cfg = gpt2_config(size, qkv_bias=True, tie_weights=True)
    # transformers on the meta device allocates no memory.
    hf_config = transformers.GPT2Config(n_embd=cfg["emb_dim"], n_layer=cfg["n_layers"], n_head=cfg["n_heads"])
    with torch.device("meta"):
        hf_count = transformers.GPT2LMHeadModel(hf_config).num_parameters()
    assert hf_count == PUBLISHED_SIZES[size]
    assert parameter_counts(cfg)["total"] == PUBLISHED_SIZES[size]
    assert parameter_counts(book_config(hf_config.to_dict()))["total"] == PUBLISHED_SIZES[size]


@pytest.mark.parametrize("wrapped", [False, True])
def test_book_state_dict(tmp_path, wrapped):
    # The book's torch GPTModel saves its causal masks too; section 5.4 also saves an optimizer.
    from reference.gpt import GPTModel as TorchGPTModel

    cfg = {**tl.GPT_CONFIG_124M, "vocab_size": 40, "context_length": 12, "emb_dim": 16, "n_heads": 4, "n_layers": 2}
    torch.manual_seed(0)
    reference = TorchGPTModel(cfg).double().eval()
    state = reference.state_dict()
    if wrapped:
        state = {"model_state_dict": state, "optimizer_state_dict": torch.optim.AdamW(reference.parameters()).state_dict()}
    torch.save(state, tmp_path / "model.pth")
    model = load_book_state_dict(cfg, tmp_path / "model.pth", dtype="float64")
    assert_logits_match(model, reference, np.random.default_rng(0).integers(0, 40, (2, 12)))


def book_params(hf_model):
    """OpenAI's checkpoint as the book's section 5.5 reads it, from a transformers model."""
    state = {k: v.numpy() for k, v in hf_model.transformer.state_dict().items()}
    leaf = {"weight": "w", "bias": "b"}
    blocks = []
    for layer in range(hf_model.config.n_layer):
        block = {"attn": {}, "mlp": {}}
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            group, module = name.split(".")
            block[group][module] = {leaf[k]: state[f"h.{layer}.{name}.{k}"] for k in leaf}
        for norm in ("ln_1", "ln_2"):
            block[norm] = {"g": state[f"h.{layer}.{norm}.weight"], "b": state[f"h.{layer}.{norm}.bias"]}
        blocks.append(block)
    return {"wte": state["wte.weight"], "wpe": state["wpe.weight"], "g": state["ln_f.weight"],
            "b": state["ln_f.bias"], "blocks": blocks}


def test_load_weights_into_gpt_as_in_the_book():
    config = small_config()
    reference = hf_gpt2(config)
    cfg = {**tl.GPT_CONFIG_124M, **book_config(config.to_dict()), "tie_weights": False}  # the book's head is its own
    gpt = load_weights_into_gpt(tl.GPTModel(cfg), book_params(reference)).eval()
    assert_logits_match(gpt, reference, token_ids(config))


# ---- downloads, from a server on 127.0.0.1 ---------------------------------------------------

HUB_FOLDER = "/openai-community/gpt2/resolve/main"


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    """A small GPT-2 as the hub serves it for "124M": {url path: bytes}, and the transformers model.

    It keeps GPT-2's vocabulary, so the command line's tokenizer can drive it.
    """
    folder = tmp_path_factory.mktemp("hub")
    reference = hf_gpt2(small_config(vocab_size=50257))
    reference.save_pretrained(folder)
    files = {f"{HUB_FOLDER}/{name}": (folder / name).read_bytes() for name in ("config.json", "model.safetensors")}
    return files, reference


def test_download_once_into_the_cache(hub_files, tmp_path, monkeypatch):
    files, reference = hub_files
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with serve(files) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url(""))
        folder = download_gpt2("gpt2-small", progress=False)
        assert folder == tmp_path / "tinygrad_llm" / "gpt2" / "124M"
        assert sorted(path for path, _ in server.requests) == sorted(files)
        assert download_gpt2("124M", progress=False) == folder
        assert len(server.requests) == 2  # the files were there: nothing fetched the second time
    for url_path, data in files.items():
        assert (folder / url_path.rsplit("/", 1)[1]).read_bytes() == data
    assert_logits_match(load_hf_gpt2(folder), reference, token_ids(reference.config))


def test_files_in_the_data_folder_are_used(hub_files, tmp_path, monkeypatch):
    files, _ = hub_files
    shipped = tmp_path / "gpt2" / "355M"
    shipped.mkdir(parents=True)
    for url_path, data in files.items():
        (shipped / url_path.rsplit("/", 1)[1]).write_bytes(data)
    monkeypatch.setenv("TINYGRAD_LLM_DATA", str(tmp_path))
    with serve({}) as server:
        assert download_gpt2("gpt2-medium", models_dir=tmp_path / "models", base_url=server.url("")) == shipped
        assert server.requests == []


def test_a_dropped_connection_resumes(hub_files, tmp_path):
    files, _ = hub_files
    weights = files[f"{HUB_FOLDER}/model.safetensors"]
    with serve(files) as server:
        server.drop_after = len(weights) // 2  # config.json is shorter and arrives whole
        with pytest.raises(RuntimeError, match="cut off"):
            download_gpt2("124M", tmp_path, base_url=server.url(""), progress=False)
        assert not (tmp_path / "124M" / "model.safetensors").exists()
        server.drop_after = None
        folder = download_gpt2("124M", tmp_path, base_url=server.url(""), progress=False)
    assert server.requests[-1] == (f"{HUB_FOLDER}/model.safetensors", f"bytes={len(weights) // 2}-")
    assert len(server.requests) == 3  # config once, the weights twice
    assert (folder / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("served, message", [
    (b"<html>Too many requests</html>", "is not a safetensors weights file"),
    ("truncated", "is not a safetensors weights file"),
    ("other size", r"wte.weight has shape \(50, 12\), .* implies \(50257, 8\)"),
])
def test_a_bad_download_is_refused_and_deleted(hub_files, tmp_path, served, message):
    files, _ = hub_files
    weights = files[f"{HUB_FOLDER}/model.safetensors"]
    if served == "truncated":
        served = weights[:-100]  # a server that sends a short file with a matching Content-Length
    elif served == "other size":
        hf_gpt2(small_config(n_embd=12)).save_pretrained(tmp_path / "other")
        served = (tmp_path / "other" / "model.safetensors").read_bytes()
    with serve({**files, f"{HUB_FOLDER}/model.safetensors": served}) as server:
        with pytest.raises(ValueError, match=message):
            download_gpt2("124M", tmp_path, base_url=server.url(""), progress=False)
    assert not (tmp_path / "124M" / "model.safetensors").exists()


def assert_same_tree(ours, expected, where="params"):
    assert type(ours) is type(expected), where
    if isinstance(expected, dict):
        assert ours.keys() == expected.keys(), where
        for key in expected:
            assert_same_tree(ours[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, list):
        assert len(ours) == len(expected), where
        for index, (a, b) in enumerate(zip(ours, expected)):
            assert_same_tree(a, b, f"{where}[{index}]")
    else:
        np.testing.assert_array_equal(ours, expected, err_msg=where)


def test_download_and_load_gpt2_as_in_the_book(hub_files, tmp_path):
    files, reference = hub_files
    with serve(files) as server:
        hparams, params = download_and_load_gpt2("124M", tmp_path, base_url=server.url(""))
    config = reference.config
    assert hparams == {"n_vocab": config.vocab_size, "n_ctx": config.n_positions, "n_embd": config.n_embd,
                         "n_head": config.n_head, "n_layer": config.n_layer}
    assert_same_tree(params, book_params(reference))


# ---- the command line ---------------------------------------------------------------------------

def test_cli_import_gpt2_then_generate(hub_files, tmp_path, capsys):
    files, reference = hub_files
    folder = tmp_path / "hf"
    reference.save_pretrained(folder)
    checkpoint = tmp_path / "gpt2.safetensors"
    assert main(["import-gpt2", "--from", str(folder), "--out", str(checkpoint)]) == 0
    model, metadata = model_from_checkpoint(checkpoint)
    assert metadata == {"source": str(folder), "tokenizer": "gpt2"}
    for name, value in load_hf_gpt2(folder).state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[name], value, err_msg=name)

    capsys.readouterr()
    generate = ["generate", "--prompt", "Every effort moves you", "--max-new-tokens", "4"]
    assert main(generate + ["--checkpoint", str(checkpoint)]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main(generate + ["--model", str(folder)]) == 0
    assert capsys.readouterr().out == from_checkpoint  # greedy: the same model gives the same text
    assert from_checkpoint.startswith("Every effort moves you") and len(from_checkpoint) > len("Every effort moves you\n")


def test_cli_generate_downloads_gpt2_on_first_use(hub_files, tmp_path, monkeypatch, capsys):
    files, _ = hub_files
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    generate = ["generate", "--model", "gpt2-small", "--max-new-tokens", "2", "--temperature", "1.5", "--top-k", "50",
                "--seed", "123"]
    with serve(files) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url(""))
        assert main(generate) == 0
        assert main(generate) == 0
    assert len(server.requests) == 2  # downloaded by the first run, found by the second
    first, second = capsys.readouterr().out.splitlines()[-2:]
    assert first == second and first.startswith("Every effort moves you")


def test_cli_without_a_network_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with serve({}) as server:  # a hub that has nothing: the download fails as it would offline
        monkeypatch.setenv("HF_ENDPOINT", server.url(""))
        with pytest.raises(SystemExit, match="HTTP 404.*\n.*needs a network"):
            main(["import-gpt2", "--from", "124M", "--out", str(tmp_path / "gpt2.safetensors")])
