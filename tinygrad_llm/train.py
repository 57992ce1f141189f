"""Pretraining: the book's chapter 5 loop, with appendix D's options and resumable checkpoints.

`train_model_simple` is the book's function with its signature and return value. Keyword
options turn on appendix D's additions (linear warmup, cosine decay, gradient clipping)
and what a long run from a terminal needs: a progress bar, checkpoints that resume bit
for bit, a clean stop on Ctrl-C, and a stop with the step named when the loss is NaN/inf.

Resuming bit for bit means the run after the checkpoint draws exactly the random numbers
(shuffling, dropout) the uninterrupted run would have. The checkpoint holds the generators'
states (tl.manual_seed's and a seeded loader's own) at the save and at the start of the
current epoch: on resume the epoch's batches are drawn again from the epoch-start states,
the ones already trained on are skipped, and the generators are then put back where the
save left them.
"""
import math
import signal
import threading
import time

import numpy as np
from tqdm.auto import tqdm

from . import backend
from . import functional as F
from .checkpoint import load_checkpoint, save_checkpoint
from .generate import generate, text_to_token_ids, token_ids_to_text
from .optim import clip_grad_norm_, lr_at_step
from .tensor import no_grad


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN or infinite; the message names the step."""


# ---- the book's chapter 5 functions -------------------------------------------------------


def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean cross-entropy of the next-token predictions of one batch (a Tensor, for backward)."""
    _check_device(model, device)
    logits = model(input_batch)  # (B, T, V)
    targets = backend.to_device(np.asarray(target_batch), model.device)
    return F.cross_entropy(logits, targets)


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Average batch loss (a float) over the first `num_batches` batches (default all); NaN if empty."""
    if len(data_loader) == 0:
        return float("nan")
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total = 0.0
    with no_grad():
        for i, (input_batch, target_batch) in enumerate(data_loader):
            if i >= num_batches:
                break
            total += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total / num_batches


def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    """(train loss, val loss) over `eval_iter` batches each, in eval mode (no dropout)."""
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
    val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def generate_and_print_sample(model, tokenizer, device, start_context, max_new_tokens=50):
    """Print a greedy continuation of `start_context` on one line (a progress check during training)."""
    _check_device(model, device)
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer)
    token_ids = generate(model, encoded, max_new_tokens, context_size)
    tqdm.write(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))


def perplexity(loss):
    """exp(loss): the number of tokens the model is as unsure between as a uniform guess."""
    return math.exp(loss) if loss < 700 else float("inf")


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                       start_context, tokenizer, *, warmup_steps=0, initial_lr=0.0, cosine_decay=False,
                       min_lr=0.0, grad_clip=None, checkpoint_path=None, resume=False, checkpoint_metadata=None,
                       stop_at_step=None, progress=True):
    """The book's training loop; returns (train_losses, val_losses, tokens_seen) at each evaluation.

    Every `eval_freq` steps the loss over `eval_iter` batches of each loader is printed
    with its perplexity; after each epoch a sample continuing `start_context` is printed
    (skipped when start_context or tokenizer is None).

    Appendix D's options: the optimizer's learning rate is the peak; `warmup_steps` ramp up
    to it linearly from `initial_lr`, `cosine_decay` then lowers it to `min_lr` by the last
    step, and `grad_clip` scales the gradients to at most that global L2 norm every step.

    With `checkpoint_path`, a checkpoint of the whole training state is written after every
    epoch, when stopped by `stop_at_step` (a number of steps) and on Ctrl-C; `resume=True`
    continues from it, bit for bit. Ctrl-C stops after the current step and re-raises
    KeyboardInterrupt once the checkpoint is written. A NaN/inf loss raises
    TrainingDivergedError before the weights are touched, and weights gone NaN/inf are never
    saved, so the last checkpoint stays a good one.
    """
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches: the text is too short for one batch "
                         "(lower the batch size or the context length)")
    total_steps = num_epochs * steps_per_epoch
    if resume:
        if checkpoint_path is None:
            raise ValueError("resume=True needs the checkpoint_path to resume from")
        state = load_checkpoint(checkpoint_path, model, optimizer)["train_state"]
        _set_generator_states(train_loader, state["generators"])
    else:
        state = {"step": 0, "epoch": 0, "batch": 0, "tokens_seen": 0, "generators": None, "epoch_generators": None,
                 "peak_lrs": [group["lr"] for group in optimizer.param_groups],
                 "history": {"train_losses": [], "val_losses": [], "tokens_seen": []}}
    history = state["history"]
    scheduled = warmup_steps > 0 or cosine_decay

    def save():
        if checkpoint_path is not None:
            if not all(bool(p.xp.isfinite(p.data).all()) for p in model.parameters()):
                raise TrainingDivergedError(f"training stopped: the weights are NaN/inf after step {state['step'] - 1}; "
                                            f"the last checkpoint {checkpoint_path} is kept")
            state["generators"] = _generator_states(train_loader)
            save_checkpoint(checkpoint_path, model, optimizer, train_state=state, **(checkpoint_metadata or {}))

    started, tokens_at_start = time.perf_counter(), state["tokens_seen"]
    with _StopOnInterrupt() as interrupt, \
            tqdm(total=total_steps, initial=state["step"], disable=not progress, unit="step") as bar:
        while state["epoch"] < num_epochs:
            model.train()
            stopped_mid_epoch = False
            for input_batch, target_batch in _epoch_batches(train_loader, state):
                global_step = state["step"]  # the book's 0-based step number
                if scheduled:
                    for group, peak_lr in zip(optimizer.param_groups, state["peak_lrs"]):
                        group["lr"] = lr_at_step(global_step, peak_lr, total_steps, warmup_steps, initial_lr,
                                                 min_lr if cosine_decay else peak_lr)
                optimizer.zero_grad()
                loss = calc_loss_batch(input_batch, target_batch, model, device)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    kept = f"; the last checkpoint {checkpoint_path} is kept" if checkpoint_path else ""
                    raise TrainingDivergedError(f"training stopped: the loss is {loss_value} at step {global_step} "
                                                f"(epoch {state['epoch'] + 1}, batch {state['batch'] + 1}){kept}; "
                                                "try a lower learning rate, warmup or gradient clipping")
                loss.backward()
                if grad_clip is not None:
                    clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                state["step"] += 1
                state["batch"] += 1
                state["tokens_seen"] += int(np.size(input_batch))

                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", ppl=f"{perplexity(loss_value):.1f}",
                                tok_s=f"{(state['tokens_seen'] - tokens_at_start) / (time.perf_counter() - started):.0f}")
                if global_step % eval_freq == 0:
                    _evaluate_and_record(model, train_loader, val_loader, device, eval_iter, state, global_step)
                if state["batch"] < steps_per_epoch and (interrupt.requested or state["step"] == stop_at_step):
                    stopped_mid_epoch = True
                    break

            if not stopped_mid_epoch:
                if start_context is not None and tokenizer is not None:
                    generate_and_print_sample(model, tokenizer, device, start_context)
                state["epoch"], state["batch"], state["epoch_generators"] = state["epoch"] + 1, 0, None
            save()
            if interrupt.requested:
                raise KeyboardInterrupt(f"training interrupted after step {state['step'] - 1}")
            if state["step"] == stop_at_step:
                break
    return history["train_losses"], history["val_losses"], history["tokens_seen"]


def _evaluate_and_record(model, train_loader, val_loader, device, eval_iter, state, global_step):
    train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
    history = state["history"]
    history["train_losses"].append(train_loss)
    history["val_losses"].append(val_loss)
    history["tokens_seen"].append(state["tokens_seen"])
    tqdm.write(f"Ep {state['epoch'] + 1} (Step {global_step:06d}): "
               f"Train loss {train_loss:.3f} (ppl {perplexity(train_loss):.1f}), "
               f"Val loss {val_loss:.3f} (ppl {perplexity(val_loss):.1f})")


def _epoch_batches(train_loader, state):
    """An iterator over this epoch's batches that have not been trained on yet.

    The generator states at the start of the epoch are recorded, so a resumed run draws
    the same shuffle again; the batches already seen are drawn (not trained on) and
    skipped, then the generators go back to where the checkpoint left them.
    """
    if state["batch"] == 0:
        state["epoch_generators"] = _generator_states(train_loader)
        return iter(train_loader)
    saved = _generator_states(train_loader)
    _set_generator_states(train_loader, state["epoch_generators"])
    batches = iter(train_loader)
    for _ in range(state["batch"]):
        next(batches)
    _set_generator_states(train_loader, saved)
    return batches


def _generator_states(loader):
    """The states of the generators shuffling and dropout draw from: tl.manual_seed's, and a
    loader's own when it was given a seed (create_dataloader_v1(seed=...))."""
    states = {"global": backend.get_rng_state()}
    if getattr(loader, "rng", None) is not None:
        states["loader"] = loader.rng.bit_generator.state
    return states


def _set_generator_states(loader, states):
    backend.set_rng_state(states["global"])
    if "loader" in states:
        loader.rng.bit_generator.state = states["loader"]


class _StopOnInterrupt:
    """While active, Ctrl-C (SIGINT) asks the loop to stop after the current step; a second one stops at once."""

    def __enter__(self):
        self.requested, self.previous = False, None
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Ctrl-C: stopping after this step and writing a checkpoint (press again to stop at once)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _check_device(model, device):
    if device is not None and backend.check_device(device) != model.device:
        raise ValueError(f"the model is on {model.device!r} but device={device!r}: move it first with model.to({device!r})")


# ---- the book's loss plot -------------------------------------------------------------------


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path):
    """The book's figure: train and val loss against epochs, a second x axis of tokens seen; a PNG at `path`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise RuntimeError("the loss plot needs matplotlib: pip install 'tinygrad_llm[plot]'") from error
    # A bare Figure draws without pyplot, so no GUI backend is touched and nothing global changes.
    fig = Figure(figsize=(5, 3))
    FigureCanvasAgg(fig)
    ax1 = fig.add_subplot()
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax2 = ax1.twiny()  # the same curve against tokens seen, drawn invisibly to place the top axis
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    fig.savefig(path)
    return path
