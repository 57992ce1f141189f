"""`tinygrad-llm evaluate` and `tinygrad-llm chat` on a tiny model and a stand-in judge."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

import tinygrad_llm as tl
from tests.ollama_server import Answer, HttpError, serve
from tinygrad_llm.cli import main
from tinygrad_llm.finetune.instruct import RESPONSE_HEAD, format_input, load_instruction_data, split_loss
from tinygrad_llm.tokenizers import get_gpt2_tokenizer

CFG = {"vocab_size": 50257, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.0, "qkv_bias": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "checkpoint.safetensors"
    tl.save_checkpoint(path, tl.GPTModel(CFG, seed=5))
    return path


@pytest.fixture()
def responses(tmp_path):
    entries = load_instruction_data()[935:939]
    with_responses = [{**entries[0], "model_response": entries[0]["output"]},
                      *({**e, "model_response": "I do not know."} for e in entries[1:])]
    path = tmp_path / "instruction-data-with-response.json"
    path.write_text(json.dumps(with_responses, indent=4))
    return path


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "tinygrad_llm", *args], input=stdin, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("command", [["finetune"], ["finetune", "instruct"], ["evaluate"], ["chat"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: tinygrad-llm" in capsys.readouterr().out


def test_evaluate_offline_and_with_a_judge(responses, tmp_path, capsys):
    answers = iter(["90", "twenty", "10", "30"])
    with serve(lambda request: Answer(next(answers))) as server:
        assert main(["evaluate", "--responses", str(responses), "--judge", server.url, "--judge-model", "judge3",
                     "--no-progress", "--json", str(tmp_path / "scores.json")]) == 0
    out = capsys.readouterr().out
    assert "4 responses: exact match 0.250, token-F1" in out
    assert "entry 1 not scored: could not convert score: 'twenty'" in out
    assert "judge judge3: average score 43.33 (scale 0-100) over 3 of 4 entries; 1 not scored" in out
    assert server.requests[0]["model"] == "judge3"
    written = json.loads((tmp_path / "scores.json").read_text())
    assert written["judge_scores"] == [90, None, 10, 30] and written["exact_match"] == 0.25


def test_evaluate_with_a_checkpoint_gives_the_loss(responses, checkpoint, capsys):
    assert main(["evaluate", "--responses", str(responses), "--checkpoint", str(checkpoint)]) == 0
    model, _ = tl.checkpoint.model_from_checkpoint(checkpoint)
    expected = split_loss(model, json.loads(responses.read_text()), get_gpt2_tokenizer(), allowed_max_length=64)
    assert f"loss {expected['loss']:.3f}, perplexity {expected['perplexity']:.2f}" in capsys.readouterr().out


def test_evaluate_without_a_judge_server_or_with_an_http_error(responses):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api/chat"
    result = run_cli("evaluate", "--responses", str(responses), "--judge", url, "--no-progress")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"no judge is answering at {url}" in result.stderr and "ollama serve" in result.stderr
    with serve(lambda request: HttpError(404, "model 'llama3' not found, try pulling it first")) as server:
        result = run_cli("evaluate", "--responses", str(responses), "--judge", server.url, "--no-progress")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "HTTP 404: model 'llama3' not found" in result.stderr


def test_evaluate_refuses_a_file_without_responses(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(load_instruction_data()[:2]))
    result = run_cli("evaluate", "--responses", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "entry 0 has no string 'model_response'" in result.stderr


def test_chat_streams_the_greedy_response_and_ends_on_ctrl_d(checkpoint):
    result = run_cli("chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "6", stdin="Say hi.\n\nName a color.\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    tokenizer = get_gpt2_tokenizer()
    model, _ = tl.checkpoint.model_from_checkpoint(checkpoint)
    expected = []
    for instruction in ["Say hi.", "Name a color."]:
        ids = tokenizer.encode(format_input({"instruction": instruction, "input": ""}) + RESPONSE_HEAD)
        out = tl.generate(model, np.array([ids]), 6, 64, eos_id=50256)[0, len(ids):]
        expected.append(tokenizer.decode(out.tolist()))
    assert result.stdout == "".join(text + "\n" for text in expected) + "\n"


def test_chat_truncates_a_long_prompt_from_the_left_and_says_so_once(checkpoint):
    long = " ".join(["word"] * 100)
    result = run_cli("chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "4", stdin=f"{long}\n{long}\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert result.stderr.count("keep only their last 60") == 1


def test_chat_ends_cleanly_on_ctrl_c(checkpoint):
    child = subprocess.Popen([sys.executable, "-m", "tinygrad_llm", "chat", "--checkpoint", str(checkpoint),
                              "--max-new-tokens", "3"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        child.stdin.write("Say hi.\n")
        child.stdin.flush()
        child.stdout.readline()  # the first response: the model is loaded, the loop waits for a line
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0 and "Traceback" not in stderr, stderr


def test_chat_refuses_a_response_longer_than_the_context(checkpoint):
    result = run_cli("chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "64")
    assert result.returncode == 2 and "--max-new-tokens must be between 1 and 63" in result.stderr


# ---- finetune instruct ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "instructions.json"
    path.write_text(json.dumps(load_instruction_data()[:20]))  # split 17 / 2 / 1
    return path


def finetune_args(checkpoint, data, out, *extra):
    return ["finetune", "instruct", "--model", str(checkpoint), "--data", str(data), "--epochs", "1",
            "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--max-new-tokens", "4",
            "--no-progress", "--out", str(out), *extra]


@pytest.mark.parametrize("extra", [[], ["--lora-rank", "2", "--mask-instruction"]])
def test_finetune_instruct_trains_answers_and_scores_the_test_split(checkpoint, small_data, tmp_path, capsys, extra):
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, small_data, out, *extra)) == 0
    printed = capsys.readouterr().out
    assert "Ep 1 (Step 000000): Train loss" in printed and "Test split: loss" in printed
    for name in ["checkpoint.safetensors", "model.safetensors", "metrics.jsonl", "loss.png", "results.json"]:
        assert (out / name).is_file(), name
    assert (out / "lora.safetensors").is_file() == bool(extra)
    # the responses file holds the test split with the responses of the saved (merged) weights
    model, _ = tl.checkpoint.model_from_checkpoint(out / "model.safetensors")
    test_data = load_instruction_data(small_data)[17:19]
    written = json.loads((out / "instruction-data-with-response.json").read_text())
    assert [{k: v for k, v in e.items() if k != "model_response"} for e in written] == test_data
    from tinygrad_llm.finetune.instruct import generate_responses

    assert [e["model_response"] for e in written] == generate_responses(model, get_gpt2_tokenizer(), test_data, 4,
                                                                       progress=False)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"loss", "perplexity", "exact_match", "token_f1", "count"} and results["count"] == 2


def test_finetune_instruct_resumes_and_refuses_too_little_data(checkpoint, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(finetune_args(checkpoint, small_data, out)) == 0
    weights = tl.checkpoint.model_from_checkpoint(out / "model.safetensors")[0].state_dict()
    assert main(["finetune", "instruct", "--out", str(out), "--resume", "--no-progress", "--max-new-tokens", "4"]) == 0
    resumed = tl.checkpoint.model_from_checkpoint(out / "model.safetensors")[0].state_dict()
    for name, value in weights.items():  # a finished run trains no more
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    with pytest.raises(SystemExit, match=r"--lr \(0.1, saved 5e-05\)"):
        main(["finetune", "instruct", "--out", str(out), "--resume", "--lr", "0.1"])
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps(load_instruction_data()[:3]))
    with pytest.raises(SystemExit, match="has 3 entries: too few"):
        main(finetune_args(checkpoint, tiny, tmp_path / "other"))
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert main(finetune_args(checkpoint, empty, tmp_path / "other")) == 2
    assert "is empty" in capsys.readouterr().err
