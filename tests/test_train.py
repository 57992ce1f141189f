"""Pretraining: the book's loop, appendix D's options, bit-for-bit resume in a fresh process, NaN stops.

Run as a script (`python tests/test_train.py CHECKPOINT OUT.npz [LOADER_SEED]`) this file
resumes the run below from CHECKPOINT in a fresh process and writes the results to OUT.npz.
"""
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import tinygrad_llm as tl
from tinygrad_llm import datasets
from tinygrad_llm.data import create_dataloader_v1
from tinygrad_llm.optim import clip_grad_norm_
from tinygrad_llm.tokenizers import get_gpt2_tokenizer
from tinygrad_llm.train import (TrainingDivergedError, TrainingInterrupted, calc_loss_batch, calc_loss_loader,
                                evaluate_model, plot_losses, train_model_simple)

CFG = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
       "drop_rate": 0.1, "qkv_bias": False}


def verdict(chars):
    with open(datasets.path("the-verdict"), encoding="utf-8") as f:
        return f.read()[:chars]


def setup(loader_seed=None, chars=1500, batch_size=2, lr=1e-3):
    """Model, optimizer and loaders of a small run, the same every time (the book's 90/10 split)."""
    tl.manual_seed(123)
    text = verdict(chars)
    split = int(0.9 * len(text))
    model = tl.GPTModel(CFG)
    optimizer = tl.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    train_loader = create_dataloader_v1(text[:split], batch_size=batch_size, max_length=16, stride=16,
                                        shuffle=True, drop_last=True, seed=loader_seed)
    val_loader = create_dataloader_v1(text[split:], batch_size=batch_size, max_length=16, stride=16,
                                      shuffle=False, drop_last=False)
    return model, optimizer, train_loader, val_loader


# warmup, cosine decay and clipping on, so the schedule's state crosses the checkpoint too
RUN = dict(num_epochs=2, eval_freq=4, eval_iter=2, start_context=None, tokenizer=None)
OPTIONS = dict(warmup_steps=3, initial_lr=1e-5, cosine_decay=True, min_lr=1e-5, grad_clip=1.0, progress=False)


def run(checkpoint=None, loader_seed=None, **options):
    model, optimizer, train_loader, val_loader = setup(loader_seed)
    losses = train_model_simple(model, train_loader, val_loader, optimizer, None, **RUN, **OPTIONS,
                                checkpoint_path=checkpoint, **options)
    return losses, model.state_dict(), len(train_loader)


def test_two_n_steps_equal_n_steps_then_resume_in_a_fresh_process(tmp_path):
    for loader_seed in (None, 7):  # shuffled by tl.manual_seed's generator, then by the loader's own
        (train, val, tokens), weights, steps_per_epoch = run(loader_seed=loader_seed)
        n = steps_per_epoch + 3  # stop three batches into the second epoch
        assert len(train) == math.ceil(2 * steps_per_epoch / 4)

        checkpoint = tmp_path / f"ck{loader_seed}.safetensors"
        first_half, _, _ = run(checkpoint, loader_seed, stop_at_step=n)
        assert len(first_half[0]) == math.ceil(n / 4)
        out = tmp_path / "resumed.npz"
        subprocess.run([sys.executable, __file__, str(checkpoint), str(out), str(loader_seed)], check=True)
        resumed = np.load(out)

        for name in ("train", "val", "tokens"):
            np.testing.assert_array_equal(resumed[name], locals()[name], err_msg=f"{name} (loader seed {loader_seed})")
        for name, array in weights.items():
            np.testing.assert_array_equal(resumed[name], array, err_msg=f"{name} (loader seed {loader_seed})")


def test_the_books_loop_learns_and_reports(capsys):
    tokenizer = get_gpt2_tokenizer()
    model, optimizer, train_loader, val_loader = setup(chars=800, lr=5e-3)
    train, val, tokens = train_model_simple(model, train_loader, val_loader, optimizer, "cpu", num_epochs=6,
                                            eval_freq=5, eval_iter=1, start_context="Every effort moves you",
                                            tokenizer=tokenizer)
    steps = 6 * len(train_loader)
    assert len(train) == len(val) == len(tokens) == math.ceil(steps / 5)
    assert tokens == [(step + 1) * 2 * 16 for step in range(0, steps, 5)]
    assert train[-1] < train[0] - 1.0  # it memorises the text
    printed = capsys.readouterr().out
    assert "Ep 1 (Step 000000): Train loss" in printed and "(ppl " in printed
    assert printed.count("Every effort moves you") == 6  # a sample after each epoch


@pytest.mark.parametrize("clip_during_warmup", [False, True])
def test_schedule_and_clipping_follow_appendix_d(clip_during_warmup):
    from reference.ops import appendix_d_lr

    model, optimizer, train_loader, val_loader = setup()
    lrs, norms = [], []
    step = optimizer.step

    def recording_step():
        lrs.append(optimizer.param_groups[0]["lr"])
        norms.append(clip_grad_norm_(model.parameters(), math.inf))  # the norm after clipping
        step()

    optimizer.step = recording_step
    max_norm = 0.5  # below the norms of this run's first steps (about 0.8)
    train_model_simple(model, train_loader, val_loader, optimizer, None, **RUN,
                       **{**OPTIONS, "grad_clip": max_norm}, clip_during_warmup=clip_during_warmup)
    total = 2 * len(train_loader)
    expected = [appendix_d_lr(s, 1e-3, total, 3, 1e-5, 1e-5) for s in range(total)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert max(norms[3:]) <= max_norm + 1e-5  # clipped once step >= warmup_steps, as the book does
    # the 3 warmup steps are clipped only when asked
    assert (max(norms[:3]) <= max_norm + 1e-5) == clip_during_warmup


def diverging_run(tmp_path, poisoned_step):
    """Two batches per epoch; the update of step `poisoned_step` makes a weight infinite."""
    model, optimizer, train_loader, val_loader = setup(chars=1100, batch_size=8)
    assert len(train_loader) == 2
    step, steps_done = optimizer.step, []

    def poisoning_step():
        step()
        if len(steps_done) == poisoned_step:
            model.out_head.weight.data[0, 0] = np.inf
        steps_done.append(1)

    optimizer.step = poisoning_step
    checkpoint = tmp_path / "ck.safetensors"
    train_model_simple(model, train_loader, val_loader, optimizer, None, num_epochs=3, eval_freq=10, eval_iter=1,
                       start_context=None, tokenizer=None, checkpoint_path=checkpoint, progress=False)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf on purpose
def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    # epoch 1 (steps 0, 1) is saved; step 2 poisons the weights, so step 3's loss is NaN
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 3 \(epoch 2, batch 2\).*ck.safetensors is kept"):
        diverging_run(tmp_path, poisoned_step=2)
    saved = tl.GPTModel(CFG)
    assert tl.load_checkpoint(tmp_path / "ck.safetensors", saved)["train_state"]["step"] == 2
    assert all(np.isfinite(p.data).all() for p in saved.parameters())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_weights_are_never_saved(tmp_path):
    # step 1, the last of epoch 1, poisons the weights: the end-of-epoch save refuses them
    with pytest.raises(TrainingDivergedError, match=r"weights are NaN/inf after step 1"):
        diverging_run(tmp_path, poisoned_step=1)
    assert not (tmp_path / "ck.safetensors").exists()


def test_losses_match_the_books_torch_loss():
    from reference import gpt as torch_gpt

    model, _, train_loader, _ = setup()
    torch_model = torch_gpt.GPTModel(CFG).eval()
    torch_gpt.load_into_torch(torch_model, model.state_dict())
    model.eval()
    tl.manual_seed(0)
    loss = calc_loss_loader(train_loader, model, None, num_batches=3)
    tl.manual_seed(0)  # the same shuffle
    expected = []
    for (inputs, targets), _ in zip(train_loader, range(3)):
        with torch.no_grad():
            logits = torch_model(torch.tensor(inputs))
        expected.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(targets).flatten()).item())
    assert loss == pytest.approx(np.mean(expected), rel=1e-5)
    assert calc_loss_loader(train_loader, model, None, num_batches=10**6) == pytest.approx(
        calc_loss_loader(train_loader, model, None), rel=1e-6)  # capped at the loader's length
    assert math.isnan(calc_loss_loader([], model, None))
    train_loss, val_loss = evaluate_model(model, train_loader, train_loader, None, eval_iter=1)
    assert model.training and np.isfinite([train_loss, val_loss]).all()


def test_ignored_targets_cost_no_logits_and_leave_the_loss_as_the_books(monkeypatch):
    # Chapter 7's batches mark padding -100: the head runs on the kept rows alone, and the
    # loss and gradients are torch's cross_entropy(ignore_index=-100) over all the logits.
    from reference import gpt as torch_gpt

    cfg = {**CFG, "drop_rate": 0.0}
    model = tl.GPTModel(cfg, dtype="float64", seed=0)
    torch_model = torch_gpt.GPTModel(cfg).double()
    torch_gpt.load_into_torch(torch_model, model.state_dict())
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, cfg["vocab_size"], (3, 6))
    targets = rng.integers(0, cfg["vocab_size"], (3, 6))
    targets[0, 4:], targets[2, 1:] = -100, -100
    head_rows = []
    head = model.out_head.forward
    monkeypatch.setattr(model.out_head, "forward", lambda x: head_rows.append(x.shape[0]) or head(x))
    loss = calc_loss_batch(inputs, targets, model, None)
    loss.backward()
    assert head_rows == [int((targets != -100).sum())]
    expected = torch.nn.functional.cross_entropy(torch_model(torch.tensor(inputs)).flatten(0, 1),
                                                 torch.tensor(targets).flatten())
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    expected_grads = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}
    np.testing.assert_allclose(model.out_head.weight.grad, expected_grads["out_head.weight"],
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.tok_emb.weight.grad, expected_grads["tok_emb.weight"],
                               rtol=1e-9, atol=1e-12)


def test_device_mismatch_is_named():
    model, _, train_loader, _ = setup()
    inputs, targets = next(iter(train_loader))
    with pytest.raises(ValueError, match="the model is on 'cpu' but device='cuda'"):
        calc_loss_batch(inputs, targets, model, "cuda")


def test_plot_writes_the_books_figure(tmp_path):
    path = plot_losses([0.5, 1.0, 1.5], [100, 200, 300], [9.0, 7.0, 6.0], [9.5, 8.0, 7.5], tmp_path / "loss.png")
    data = open(path, "rb").read()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


# ---- the engine: accumulation, metrics log, save_every, SIGTERM ------------------------------


def f64_setup(n_batches, batch_size):
    """A float64 model without dropout and fixed batches, so two runs can agree to rounding."""
    tl.manual_seed(5)
    model = tl.GPTModel({**CFG, "drop_rate": 0.0}, dtype="float64")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 100, (n_batches * batch_size, 17))
    batches = [(ids[i:i + batch_size, :-1], ids[i:i + batch_size, 1:]) for i in range(0, len(ids), batch_size)]
    return model, batches


def lm_loss(model, batch):
    return calc_loss_batch(*batch, model, None)


def concatenated(batches, k):
    return [tuple(np.concatenate(parts) for parts in zip(*batches[i:i + k])) for i in range(0, len(batches), k)]


@pytest.mark.parametrize("n_batches, k", [(6, 2), (5, 2), (6, 3)])
def test_k_micro_batches_of_b_make_one_step_of_kb(n_batches, k):
    # 5 batches with k=2: the epoch's last step takes the one micro-batch left, averaged alone
    results = []
    for accumulation_steps in (k, 1):
        model, batches = f64_setup(n_batches, 2)
        loader = batches if accumulation_steps > 1 else concatenated(batches, k)
        optimizer = tl.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        history = tl.train.train(model, optimizer, loader, lm_loss, num_epochs=2, accumulation_steps=accumulation_steps,
                                 evaluate=lambda: {"loss": calc_loss_loader(batches, model, None)}, progress=False)
        results.append((history, model.state_dict()))
    (history, weights), (expected_history, expected_weights) = results
    assert [r["step"] for r in history] == [r["step"] for r in expected_history] == list(range(2 * math.ceil(n_batches / k)))
    # float64: the mean of k means of B equals the mean of kB up to rounding
    np.testing.assert_allclose([r["loss"] for r in history], [r["loss"] for r in expected_history], rtol=1e-10)
    assert [r["tokens_seen"] for r in history] == [r["tokens_seen"] for r in expected_history]
    for name, array in expected_weights.items():
        np.testing.assert_allclose(weights[name], array, rtol=1e-9, atol=1e-12, err_msg=name)


def test_the_metrics_log_holds_one_line_per_record_and_is_rewritten_on_resume(tmp_path):
    metrics, checkpoint = tmp_path / "metrics.jsonl", tmp_path / "ck.safetensors"

    def run_with_log(**options):
        model, batches = f64_setup(4, 2)
        optimizer = tl.optim.AdamW(model.parameters(), lr=1e-2)
        return tl.train.train(model, optimizer, batches, lm_loss, num_epochs=2, eval_freq=3, seen="examples",
                              evaluate=lambda: {"val_loss": calc_loss_loader(batches, model, None)},
                              epoch_end=lambda epoch: {"epoch_loss": calc_loss_loader(batches, model, None)},
                              metrics_path=metrics, checkpoint_path=checkpoint, progress=False, **options)

    full = run_with_log()
    assert tl.train.read_metrics(metrics) == full
    assert [(r["event"], r["step"], r["epoch"], r["examples_seen"]) for r in full] == [
        ("eval", 0, 1, 2), ("eval", 3, 1, 8), ("epoch", 3, 1, 8), ("eval", 6, 2, 14), ("epoch", 7, 2, 16)]
    assert all(r["lr"] == 1e-2 and r["seconds"] >= 0 for r in full)

    run_with_log(stop_at_step=5)
    with open(metrics, "a") as f:  # what a run killed after its last save had logged as well
        f.write('{"event": "eval", "step": 6, "val_loss": 0.0}\n')
    resumed = run_with_log(resume=True)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in tl.train.read_metrics(metrics)] == strip
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed] == strip


class Killed(Exception):
    """Stands in for a SIGKILL: the run ends between two steps without saving."""


def test_save_every_checkpoints_mid_epoch_and_resume_stays_bit_for_bit(tmp_path):
    (train, val, tokens), weights, steps_per_epoch = run(loader_seed=7)
    checkpoint = tmp_path / "ck.safetensors"
    model, optimizer, train_loader, val_loader = setup(7)
    step, done = optimizer.step, []

    def killed_after_step_8():
        step()
        done.append(1)
        if len(done) == 8:
            raise Killed

    optimizer.step = killed_after_step_8
    with pytest.raises(Killed):
        train_model_simple(model, train_loader, val_loader, optimizer, None, **RUN, **OPTIONS,
                           checkpoint_path=checkpoint, save_every=3)
    state = tl.load_checkpoint(checkpoint, tl.GPTModel(CFG))["train_state"]
    assert steps_per_epoch > 6 and state["step"] == 6 and state["epoch"] == 0  # the last save: mid-epoch
    out = tmp_path / "resumed.npz"
    subprocess.run([sys.executable, __file__, str(checkpoint), str(out), "7"], check=True)
    resumed = np.load(out)
    for name in ("train", "val", "tokens"):
        np.testing.assert_array_equal(resumed[name], locals()[name], err_msg=name)
    for name, array in weights.items():
        np.testing.assert_array_equal(resumed[name], array, err_msg=name)


def test_sigterm_saves_a_checkpoint_and_stops_as_ctrl_c(tmp_path):
    checkpoint = tmp_path / "ck.safetensors"
    model, optimizer, train_loader, val_loader = setup()
    step, done = optimizer.step, []

    def terminated_during_step_3():
        done.append(1)
        if len(done) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a job scheduler does
        step()

    optimizer.step = terminated_during_step_3
    with pytest.raises(TrainingInterrupted, match="interrupted by SIGTERM after step 2") as stopped:
        train_model_simple(model, train_loader, val_loader, optimizer, None, **RUN, checkpoint_path=checkpoint,
                           progress=False)
    assert stopped.value.signum == signal.SIGTERM and isinstance(stopped.value, KeyboardInterrupt)
    assert tl.load_checkpoint(checkpoint, tl.GPTModel(CFG))["train_state"]["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


@pytest.mark.parametrize("option, value", [("eval_freq", 0), ("accumulation_steps", 0), ("save_every", 0),
                                           ("accumulation_steps", 1.5), ("grad_clip", 0.0), ("grad_clip", math.nan),
                                           ("num_epochs", -1), ("seen", "words")])
def test_bad_options_are_named(option, value):
    model, batches = f64_setup(2, 2)
    options = {"num_epochs": 1, option: value}
    with pytest.raises(ValueError, match=option):
        tl.train.train(model, tl.optim.AdamW(model.parameters()), batches, lm_loss, **options)


if __name__ == "__main__":
    checkpoint, out, loader_seed = sys.argv[1], sys.argv[2], sys.argv[3]
    (train, val, tokens), weights, _ = run(checkpoint, None if loader_seed == "None" else int(loader_seed), resume=True)
    np.savez(out, train=train, val=val, tokens=tokens, **weights)
