"""`tinygrad-llm finetune dpo | reward | ppo` on a tiny model: outputs written, bad input refused cleanly."""
import json

import pytest

import tinygrad_llm as tl
from tinygrad_llm.checkpoint import model_from_checkpoint, read_checkpoint
from tinygrad_llm.cli import main
from tinygrad_llm.finetune import preference

CFG = {"vocab_size": 50257, "context_length": 256, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.1, "qkv_bias": False}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    path = tmp_path_factory.mktemp("preference") / "start.safetensors"
    tl.save_checkpoint(path, tl.GPTModel(CFG, seed=0))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The book's first 40 entries (none with identical answers): split 34 / 4 / 2, quick to tokenize."""
    path = tmp_path_factory.mktemp("preference") / "prefs.json"
    path.write_text(json.dumps(preference.load_preference_data(allow_identical=True)[:40]))
    return path


def quick(data):
    return ["--data", str(data), "--max-steps", "2", "--batch-size", "2", "--eval-freq", "1", "--eval-iter", "1",
            "--no-progress"]


def test_dpo_writes_checkpoint_metrics_and_plot(start, data, tmp_path, capsys):
    out = tmp_path / "dpo"
    assert main(["finetune", "dpo", "--model", str(start), "--out", str(out), *quick(data)]) == 0
    printed = capsys.readouterr().out
    assert "before training: train loss 0.6931, val loss 0.6931" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [0, 1]
    assert {"train_loss", "val_chosen_reward", "val_rejected_reward"} <= set(records[0])
    assert (out / "dpo.png").stat().st_size > 0
    model, _ = model_from_checkpoint(out / "checkpoint.safetensors")
    assert model.cfg["emb_dim"] == 16


def test_reward_then_ppo_with_that_reward_model(start, data, tmp_path, capsys):
    reward_out, ppo_out = tmp_path / "reward", tmp_path / "ppo"
    assert main(["finetune", "reward", "--model", str(start), "--out", str(reward_out), *quick(data)]) == 0
    assert "Validation: accuracy" in capsys.readouterr().out
    assert (reward_out / "reward.png").stat().st_size > 0
    assert read_checkpoint(reward_out / "reward_model.safetensors")["metadata"]["reward_model"]
    assert main(["finetune", "ppo", "--model", str(start), "--out", str(ppo_out), "--reward-model",
                 str(reward_out / "reward_model.safetensors"), "--steps", "2", "--batch-size", "2",
                 "--response-length", "4", "--no-progress"]) == 0
    assert "Mean reward" in capsys.readouterr().out
    assert (ppo_out / "ppo.png").stat().st_size > 0
    assert len((ppo_out / "metrics.jsonl").read_text().splitlines()) == 2


def test_ppo_with_a_toy_token_reward(start, tmp_path):
    out = tmp_path / "ppo"
    assert main(["finetune", "ppo", "--model", str(start), "--out", str(out), "--reward-tokens", "yes please",
                 "--steps", "1", "--batch-size", "2", "--response-length", "3", "--no-progress"]) == 0
    model, metadata = model_from_checkpoint(out / "checkpoint.safetensors")
    state = metadata["ppo_state"]
    assert state["step"] == 1 and len(state["history"]["reward_mean"]) == 1
    assert (out / "checkpoint.value.safetensors").exists()


def test_bad_options_and_data_are_refused_without_a_traceback(start, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:  # argparse's usage error, before the model is loaded
        main(["finetune", "dpo", "--model", str(start), "--out", str(tmp_path / "a"), "--beta", "0", *quick(data)])
    assert refused.value.code == 2 and "argument --beta: value must be > 0.0, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    same = tmp_path / "same.json"
    same.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "chosen": "Hi!", "rejected": "Hi!"}] * 20))
    assert main(["finetune", "dpo", "--model", str(start), "--out", str(tmp_path / "b"), *quick(same)]) == 2
    error = capsys.readouterr().err
    assert "entry 0 has the same text as chosen and rejected" in error and "Traceback" not in error

