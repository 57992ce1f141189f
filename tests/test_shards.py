"""Token shards: prepare (many processes, resumable, a no-op when done) and training from them memory-mapped."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinygrad_llm as tl
from tinygrad_llm import shards
from tinygrad_llm.data import DataLoader, GPTDatasetV1
from tinygrad_llm.shards import ShardDataset, ShardError, prepare, read_index
from tinygrad_llm.tokenizers import get_gpt2_tokenizer
from tinygrad_llm.train import calc_loss_batch, train

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat and then it ran away quickly from everyone 42 , . é 😀".split()
TINY = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
        "drop_rate": 0.0, "qkv_bias": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Seven documents of different lengths, two in a subfolder, one empty, and a hidden file."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir()
    for i in range(7):
        path = folder / ("sub" if i % 2 else "") / f"doc{i}.txt"
        path.write_text("" if i == 3 else " ".join(rng.choice(WORDS, size=rng.integers(20, 300))), encoding="utf-8")
    (folder / ".hidden").write_text("never read", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "out"
    prepare(corpus, out, shard_tokens=100, processes=2, progress=False)
    return out


def concatenated(corpus):
    return "<|endoftext|>".join(path.read_text(encoding="utf-8") for path in shards.documents(corpus))


def test_the_shards_hold_the_concatenated_texts_tokens(corpus, prepared):
    expected = get_gpt2_tokenizer().encode(concatenated(corpus), allowed_special={"<|endoftext|>"})
    index = read_index(prepared)
    assert index["documents"] == 7 and index["tokens"] == len(expected)
    assert [shard["tokens"] for shard in index["shards"]] == [100] * (len(expected) // 100) + [len(expected) % 100]
    stream = np.concatenate([np.load(prepared / shard["name"]) for shard in index["shards"]])
    assert stream.dtype == np.uint16 and stream.tolist() == expected


@pytest.mark.parametrize("max_length, stride", [(16, 16), (7, 3), (100, 100), (150, 40)])
def test_shard_windows_are_the_concatenated_texts_windows(corpus, prepared, max_length, stride):
    # Windows cross shard boundaries (100 tokens each) wherever they fall.
    ours = ShardDataset(prepared, max_length, stride)
    book = GPTDatasetV1(concatenated(corpus), get_gpt2_tokenizer(), max_length, stride)
    assert len(ours) == len(book)
    everything = np.arange(len(book))
    for got, expected in zip(ours.batch(everything), book.batch(everything)):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(ours[len(ours) - 1][1], book[len(book) - 1][1])


def test_training_from_shards_equals_training_on_the_concatenated_text(corpus, prepared):
    def run(dataset):
        tl.manual_seed(5)
        model = tl.GPTModel(TINY)
        optimizer = tl.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []

        def loss_fn(model, batch):
            loss = calc_loss_batch(*batch, model, None)
            losses.append(loss.item())
            return loss

        train(model, optimizer, DataLoader(dataset, 4, shuffle=True, drop_last=True, seed=9), loss_fn, 2,
              progress=False)
        return losses, model.state_dict()

    from_shards, from_text = run(ShardDataset(prepared, 16, 16)), run(
        GPTDatasetV1(concatenated(corpus), get_gpt2_tokenizer(), 16, 16))
    assert from_shards[0] == from_text[0]
    for name, weight in from_shards[1].items():
        np.testing.assert_array_equal(weight, from_text[1][name])


def test_a_second_run_writes_nothing(corpus, prepared):
    before = {path.name: path.stat().st_mtime_ns for path in prepared.iterdir()}
    index = prepare(corpus, prepared, shard_tokens=100, processes=2, progress=False)
    assert {path.name: path.stat().st_mtime_ns for path in prepared.iterdir()} == before
    assert index == read_index(prepared)


def test_an_interrupted_run_resumes_after_its_last_shard(corpus, prepared, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_shard = shards._write_shard

    def killed_after_three_shards(folder, index, tokens):
        if len(index["shards"]) == 3:
            raise KeyboardInterrupt
        write_shard(folder, index, tokens)

    monkeypatch.setattr(shards, "_write_shard", killed_after_three_shards)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, out, shard_tokens=100, processes=2, progress=False)
    monkeypatch.setattr(shards, "_write_shard", write_shard)
    with pytest.raises(ShardError, match="unfinished prepare: run it again"):
        read_index(out)
    written = {name: (out / name).stat().st_mtime_ns for name in ["shard_00000.npy", "shard_00002.npy"]}

    prepare(corpus, out, shard_tokens=100, processes=2, progress=False)
    assert {name: (out / name).stat().st_mtime_ns for name in written} == written
    assert read_index(out)["shards"] == read_index(prepared)["shards"]  # the same sha256s as a run in one go


def test_a_corpus_larger_than_the_memory_limit_trains(tmp_path):
    # 400 MB of tokens (a sparse file: no disk used) under a 150 MB limit on the process's
    # data segment, which memory-mapped file pages do not count against but any copy would.
    n_tokens = 200_000_000
    folder = tmp_path / "big"
    folder.mkdir()
    np.lib.format.open_memmap(folder / "shard_00000.npy", mode="w+", dtype=np.uint16, shape=(n_tokens,)).flush()
    index = {"format": shards.FORMAT, "tokenizer": "gpt2", "dtype": "uint16", "shard_tokens": n_tokens,
             "fingerprint": "-", "documents": 1, "tokens": n_tokens, "complete": True,
             "shards": [{"name": "shard_00000.npy", "tokens": n_tokens, "sha256": "not checked here"}]}
    (folder / "index.json").write_text(json.dumps(index))
    script = f"""
import resource
resource.setrlimit(resource.RLIMIT_DATA, ({150 << 20}, {150 << 20}))
import numpy as np
import tinygrad_llm as tl
from tinygrad_llm.data import DataLoader
from tinygrad_llm.shards import ShardDataset
from tinygrad_llm.train import calc_loss_batch, train
loader = DataLoader(ShardDataset({str(folder)!r}, 64, 64, verify=False), 4, shuffle=True, drop_last=True, seed=0)
model = tl.GPTModel({{**{TINY!r}, "vocab_size": 1000, "context_length": 64}})
train(model, tl.optim.AdamW(model.parameters(), lr=1e-3), loader, lambda m, b: calc_loss_batch(*b, m, None), 1,
      stop_at_step=3, progress=False)
print("trained")
try:
    np.fromfile({str(folder / "shard_00000.npy")!r}, dtype=np.uint16)
except MemoryError:
    print("a copy does not fit")
"""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.stdout.split() == ["trained", "a", "copy", "does", "not", "fit"], result.stderr[-2000:]


# ---- bad input ---------------------------------------------------------------------------


def test_an_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="empty holds no files"):
        prepare(tmp_path / "empty", tmp_path / "out", progress=False)


@pytest.mark.parametrize("data, shard_tokens, message", [
    ("missing", 100, "missing is neither a file nor a folder"),
    ("empty", 0, "shard_tokens must be a whole number >= 1, got 0"),
    ("empty", 2.5, "shard_tokens must be a whole number >= 1, got 2.5"),
])
def test_prepare_refuses_a_missing_input_or_a_bad_shard_size(tmp_path, data, shard_tokens, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=message):
        prepare(tmp_path / data, tmp_path / "out", shard_tokens=shard_tokens, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_binary_file_is_named(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "corpus" / "b.bin").write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ShardError, match=r"b\.bin is not UTF-8 text"):
        prepare(tmp_path / "corpus", tmp_path / "out", processes=1, progress=False)


def test_a_damaged_shard_fails_its_sha256(prepared, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in prepared.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    data = bytearray((copy / "shard_00001.npy").read_bytes())
    data[-1] ^= 1
    (copy / "shard_00001.npy").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard .*shard_00001\.npy fails its sha256 check"):
        ShardDataset(copy, 16, 16)
    (copy / "shard_00001.npy").unlink()
    with pytest.raises(ShardError, match=r"index\.json names the shard shard_00001\.npy, which is missing"):
        ShardDataset(copy, 16, 16)


def test_shards_of_another_input_are_not_overwritten(corpus, prepared, tmp_path):
    (tmp_path / "other.txt").write_text("another corpus", encoding="utf-8")
    with pytest.raises(ShardError, match="holds shards of another input or other settings"):
        prepare(tmp_path / "other.txt", prepared, shard_tokens=100, progress=False)
    with pytest.raises(ShardError, match="another input or other settings"):
        prepare(corpus, prepared, shard_tokens=99, progress=False)


def test_too_few_tokens_for_a_window(prepared):
    with pytest.raises(ValueError, match="too few for one window"):
        ShardDataset(prepared, 16, 16, start=0, stop=10)


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tinygrad_llm", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_prepare_then_pretrain_from_the_command_line(corpus, tmp_path):
    result = cli("prepare", "--data", str(corpus), "--out", "shards", "--shard-tokens", "500", "--processes", "2",
                 "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "7 documents" in result.stdout and "shards/index.json" in result.stdout
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    result = cli("pretrain", "--data", "shards", "--config", "tiny.json", "--epochs", "1", "--batch-size", "2",
                 "--eval-freq", "100", "--out", "run", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()


@pytest.mark.parametrize("args, message", [
    (["--data", "missing-folder"], "argument --data: missing-folder does not exist"),
    (["--data", "empty"], "empty holds no files"),
    (["--data", "empty", "--shard-tokens", "0"], "argument --shard-tokens: value must be an integer >= 1, got 0"),
])
def test_prepare_refuses_bad_input_in_one_line(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    result = cli("prepare", *args, "--out", "out", cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_training_from_shards_resumes_mid_epoch_bit_for_bit(prepared, tmp_path):
    def run(checkpoint, **options):
        tl.manual_seed(5)
        model = tl.GPTModel({**TINY, "drop_rate": 0.1})
        optimizer = tl.optim.AdamW(model.parameters(), lr=1e-3)
        loader = DataLoader(ShardDataset(prepared, 16, 16), 4, shuffle=True, drop_last=True, seed=9)
        train(model, optimizer, loader, lambda m, b: calc_loss_batch(*b, m, None), 2, checkpoint_path=checkpoint,
              progress=False, **options)
        return model.state_dict()

    assert len(DataLoader(ShardDataset(prepared, 16, 16), 4, drop_last=True)) > 4  # step 4 is mid-epoch
    whole = run(tmp_path / "whole.safetensors")
    run(tmp_path / "halves.safetensors", stop_at_step=4)
    resumed = run(tmp_path / "halves.safetensors", resume=True)
    for name, weight in whole.items():
        np.testing.assert_array_equal(resumed[name], weight)
