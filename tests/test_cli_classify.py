"""`tinygrad-llm finetune classify` and `tinygrad-llm classify` on a tiny model and a small SMS file."""
import json
import os
import subprocess
import sys

import pytest

import tinygrad_llm as tl
from tinygrad_llm.cli import main
from tinygrad_llm.finetune.classify import load_classifier, load_sms_spam

CFG = {"vocab_size": 50257, "context_length": 32, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.1, "qkv_bias": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classify")
    rows = load_sms_spam()
    spam = [row for row in rows if row[0] == "spam"][:40]
    ham = [row for row in rows if row[0] == "ham"][:60]
    (folder / "sms.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in ham + spam), encoding="utf-8")
    tl.manual_seed(0)
    tl.save_checkpoint(folder / "base.safetensors", tl.GPTModel(CFG))
    return folder


def finetune_args(files, out, *extra):
    return ["finetune", "classify", "--model", str(files / "base.safetensors"), "--data", str(files / "sms.tsv"),
            "--max-length", "32", "--epochs", "2", "--eval-freq", "2", "--eval-iter", "1", "--lr", "1e-3",
            "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def classifier(files):
    out = files / "run"
    assert main(finetune_args(files, out, "--trainable", "all", "--token", "last-real")) == 0
    return out


def test_finetune_writes_the_classifier_the_metrics_the_table_and_the_plots(classifier):
    accuracy = json.loads((classifier / "accuracy.json").read_text())
    assert set(accuracy) == {"training", "validation", "test", "minutes", "trainable_parameters"}
    records = tl.train.read_metrics(classifier / "metrics.jsonl")
    assert [r["event"] for r in records if r["event"] == "epoch"] == ["epoch", "epoch"]
    assert all("examples_seen" in r for r in records)
    for plot in ("loss-plot.png", "accuracy-plot.png"):
        assert (classifier / plot).read_bytes().startswith(b"\x89PNG")
    model, settings = load_classifier(classifier / "classifier.safetensors")
    assert settings["token"] == "last-real" and settings["max_length"] == 32 and model.out_head.weight.shape == (2, 16)


def test_finetune_prints_the_books_lines(files, tmp_path, capsys):
    assert main(finetune_args(files, tmp_path, "--epochs", "1")) == 0
    out = capsys.readouterr().out
    assert "Ep 1 (Step 000000): Train loss" in out and "Training accuracy: " in out and "| test |" in out
    assert "trainable last-block" in out


def test_classify_reads_texts_from_flags_and_from_stdin(classifier, capsys, monkeypatch):
    checkpoint = str(classifier / "classifier.safetensors")
    assert main(["classify", "--checkpoint", checkpoint, "--text", "WINNER!! Claim your prize now", "--text",
                 "see you at lunch " * 40]) == 0  # the second is cut to max_length, as the book does
    labels = capsys.readouterr().out.split("\n")
    assert all(label in ("spam", "not spam") for label in labels[:2]) and labels[2:] == [""]
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("Free entry in a weekly competition\nok lar\n"))
    assert main(["classify", "--checkpoint", checkpoint]) == 0
    assert len(capsys.readouterr().out.split()) >= 2


def test_lora_fine_tunes_the_adapters_and_classify_loads_them(files, tmp_path, capsys):
    assert main(finetune_args(files, tmp_path, "--epochs", "1", "--lora-rank", "2", "--lora-alpha", "4")) == 0
    out = capsys.readouterr().out
    # rank 2 on every Linear: 4 attention + 2 FFN projections per block, and the head
    per_block = 4 * 2 * (16 + 16) + 2 * (16 + 64) + 2 * (64 + 16)
    assert f"LoRA adapters: {2 * per_block + 2 * (16 + 2):,} trainable" in out
    model, settings = load_classifier(tmp_path / "classifier.safetensors")
    assert settings["lora"] == {"rank": 2, "alpha": 4.0}
    assert main(["classify", "--checkpoint", str(tmp_path / "classifier.safetensors"), "--text", "hello"]) == 0


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "tinygrad_llm", *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ})


@pytest.mark.parametrize("bad, message", [
    (["--text", "   "], "--text number 1 is empty"),
    ([], "line 2 of standard input is empty"),
])
def test_an_empty_text_is_an_error(classifier, bad, message):
    result = run_cli("classify", "--checkpoint", str(classifier / "classifier.safetensors"), *bad, stdin="hi\n\n")
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_classify_refuses_a_checkpoint_that_is_no_classifier(files):
    result = run_cli("classify", "--checkpoint", str(files / "base.safetensors"), "--text", "hi")
    assert result.returncode != 0 and "is not a classifier checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "-1"], "argument --epochs: value must be an integer >= 1, got -1"),
    (["--lr", "0"], "argument --lr: value must be > 0.0, got 0.0"),
    (["--lora-alpha", "8"], "--lora-alpha needs --lora-rank"),
    (["--max-length", "64"], "more than the model's context of 32"),
    (["--model", "no-such-model"], "neither a GPT-2 size"),
])
def test_bad_options_are_named(files, tmp_path, extra, message):
    args = finetune_args(files, tmp_path, *extra)
    if "--max-length" in extra:
        args.remove("32")
        args.remove("--max-length")
    if "--model" in extra:
        index = args.index("--model")
        del args[index:index + 2]
    result = run_cli(*args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("content, message", [
    ("ham\thello\nmaybe\tbuy now\n", "line 2: expected a label (ham or spam)"),
    ("ham hello\n", "line 1: expected a label (ham or spam), a tab and a text"),
])
def test_a_bad_data_file_is_named(files, tmp_path, content, message):
    data = tmp_path / "bad.tsv"
    data.write_text(content)
    args = finetune_args(files, tmp_path / "run")
    args[args.index("--data") + 1] = str(data)
    result = run_cli(*args)
    assert result.returncode != 0 and message in result.stderr and str(data) in result.stderr
    assert "Traceback" not in result.stderr
