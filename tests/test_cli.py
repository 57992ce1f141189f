"""The `tinygrad-llm` command line on a tiny config: pretrain, resume, Ctrl-C, generate, info."""
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest

import tinygrad_llm as tl
from tinygrad_llm import datasets
from tinygrad_llm.checkpoint import model_from_checkpoint, read_checkpoint
from tinygrad_llm.cli import main
from tinygrad_llm.tokenizers import get_gpt2_tokenizer
from tests.http_server import serve

CFG = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.1, "qkv_bias": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    with open(datasets.path("the-verdict"), encoding="utf-8") as f:
        (folder / "text.txt").write_text(f.read()[:3000], encoding="utf-8")
    (folder / "tiny.json").write_text(json.dumps(CFG))
    return folder


def pretrain_args(files, out, *extra):
    return ["pretrain", "--data", str(files / "text.txt"), "--config", str(files / "tiny.json"),
            "--batch-size", "4", "--eval-iter", "1", "--no-progress", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(files):
    """A finished two-epoch run (with its loss plot), shared by the tests that read it."""
    out = files / "run"
    assert main(pretrain_args(files, out, "--epochs", "2", "--plot")) == 0
    return out


@pytest.mark.parametrize("command", [[], ["pretrain"], ["generate"], ["info"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: tinygrad-llm" in capsys.readouterr().out


def test_pretrain_writes_checkpoint_and_plot(trained):
    state = read_checkpoint(trained / "checkpoint.safetensors")["metadata"]["train_state"]
    assert state["epoch"] == 2 and state["step"] > 0
    evals = [record for record in state["history"] if record["event"] == "eval"]
    assert len(evals) > 1 and all("train_loss" in r and "val_loss" in r for r in evals)
    assert tl.train.read_metrics(trained / "metrics.jsonl") == state["history"]
    assert (trained / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_pretrain_output(files, tmp_path, capsys):
    assert main(pretrain_args(files, tmp_path, "--epochs", "1")) == 0
    out = capsys.readouterr().out
    assert "Ep 1 (Step 000000): Train loss" in out and "Val loss" in out and "(ppl " in out
    assert "Every effort moves you" in out  # the sample after the epoch
    assert "Final: train loss" in out and str(tmp_path / "checkpoint.safetensors") in out


def test_resume_of_a_finished_run_trains_no_more_and_refuses_changed_settings(files, trained, capsys):
    before = read_checkpoint(trained / "checkpoint.safetensors")["metadata"]["train_state"]["step"]
    # The run's data is a file: resuming names it again (a checkpoint never picks the file to read).
    data = ["--data", str(files / "text.txt")]
    assert main(["pretrain", "--out", str(trained), "--resume", "--no-progress", *data]) == 0
    assert read_checkpoint(trained / "checkpoint.safetensors")["metadata"]["train_state"]["step"] == before
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"--lr \(0.5, saved 0.0004\)"):
        main(["pretrain", "--out", str(trained), "--resume", "--lr", "0.5", *data])


def test_save_every_writes_mid_epoch_checkpoints(files, tmp_path, monkeypatch):
    saved_steps = []
    save = tl.train.save_checkpoint

    def recording_save(path, model, optimizer=None, **metadata):
        saved_steps.append(metadata["train_state"]["step"])
        save(path, model, optimizer, **metadata)

    monkeypatch.setattr(tl.train, "save_checkpoint", recording_save)
    assert main(pretrain_args(files, tmp_path / "run", "--epochs", "2", "--save-every", "2")) == 0
    steps_per_epoch = saved_steps[-1] // 2
    assert steps_per_epoch > 2
    expected = sorted({*range(2, 2 * steps_per_epoch, 2), steps_per_epoch, 2 * steps_per_epoch})
    assert saved_steps == expected


def test_save_every_must_be_positive(files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(pretrain_args(files, tmp_path, "--save-every", "0"))
    assert "argument --save-every: value must be an integer >= 1, got 0" in capsys.readouterr().err


def test_generate_streams_what_the_api_generates(trained, capsys):
    checkpoint = str(trained / "checkpoint.safetensors")
    assert main(["generate", "--checkpoint", checkpoint, "--prompt", "I had always", "--max-new-tokens", "25"]) == 0
    printed = capsys.readouterr().out

    tokenizer = get_gpt2_tokenizer()
    model, _ = model_from_checkpoint(checkpoint)
    prompt = np.array([tokenizer.encode("I had always")])
    expected = tokenizer.decode(tl.generate(model, prompt, 25, context_size=16)[0].tolist())
    assert printed == expected + "\n"


def test_generate_with_a_seed_is_reproducible(trained, capsys):
    args = ["generate", "--checkpoint", str(trained / "checkpoint.safetensors"), "--max-new-tokens", "10",
            "--temperature", "1.0", "--top-k", "50", "--top-p", "0.95"]
    outputs = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_info(trained, capsys):
    assert main(["info", "--checkpoint", str(trained / "checkpoint.safetensors")]) == 0
    out = capsys.readouterr().out
    assert '"emb_dim": 16' in out
    assert f"parameters  {2 * 50257 * 16 + 16 * 16 + 16 * 16 * 4 + 16 + 16 * 64 * 2 + 64 + 16 + 4 * 16 + 2 * 16:,}" in out
    assert "optimizer state" in out and "AdamW" in out and "epoch 2" in out


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_pickle_checkpoint_is_refused_without_running_it(tmp_path, capsys, command):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Payload(tmp_path / "payload-ran")))
    assert main([command, "--checkpoint", str(path)]) == 2
    assert "evil.safetensors is not a safetensors checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "payload-ran").exists()


def test_unknown_data_and_config_are_named(files, tmp_path):
    with pytest.raises(SystemExit, match="--data 'no-such-thing' is not a file"):
        main(["pretrain", "--data", "no-such-thing", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown config 'gpt5'"):
        main(["pretrain", "--config", "gpt5", "--out", str(tmp_path)])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_writes_a_checkpoint_and_resume_finishes(files, tmp_path, capsys, signum):
    out = tmp_path / "run"
    args = pretrain_args(files, out, "--epochs", "3", "--eval-freq", "1")
    child = subprocess.Popen([sys.executable, "-m", "tinygrad_llm", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in child.stdout:
            if line.startswith("Ep 1 (Step 000002)"):  # training is under way
                child.send_signal(signum)
                break
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + signum, stderr  # 130 for Ctrl-C, 143 for SIGTERM
    assert "Interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    state = read_checkpoint(out / "checkpoint.safetensors")["metadata"]["train_state"]
    assert state["step"] >= 3 and state["epoch"] == 0  # stopped after a finished step, mid-epoch

    resume = stderr.strip().splitlines()[-1].split()  # the command the message suggests
    assert resume[:2] == ["tinygrad-llm", "pretrain"]
    assert main([*resume[1:], "--no-progress"]) == 0
    finished = read_checkpoint(out / "checkpoint.safetensors")["metadata"]["train_state"]
    assert finished["epoch"] == 3
    evals = [record for record in finished["history"] if record["event"] == "eval"]
    assert [r["step"] for r in evals] == list(range(finished["step"]))  # one evaluation per step, none lost


def test_a_failed_download_ends_with_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    # No local copy, an empty cache, and the registry's URL on a local server that answers 404.
    monkeypatch.setenv("TINYGRAD_LLM_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with serve({}) as server:
        verdict = datasets.REGISTRY["the-verdict"]
        monkeypatch.setitem(datasets.REGISTRY, "the-verdict",
                            dataclasses.replace(verdict, url=server.url("/the-verdict.txt")))
        code = main(["pretrain", "--data", "the-verdict", "--config", "tiny",
                     "--out", str(tmp_path / "run")])
    assert code == 2
    message = capsys.readouterr().err
    assert "404" in message and "needs a network" in message
