"""THE training loop: pretraining (chapter 5) and every fine-tune run through `train`.

A task brings what is particular to it -- its loaders, a loss of one batch, an evaluation --
and `train` owns everything else: the optimizer step, gradient accumulation, appendix D's
warmup / cosine decay / clipping, the progress bar, a metrics log, checkpoints that resume
bit for bit, Ctrl-C and SIGTERM, and stopping on a NaN. The book's loops are thin wrappers
over it: `train_model_simple` here (chapter 5), `train_classifier_simple` in
`finetune.classify` (chapter 6).

    history = train(model, optimizer, train_loader, loss_fn, num_epochs,
                    evaluate=None, eval_freq=1, epoch_end=None, seen="tokens", report=None,
                    accumulation_steps=1,
                    warmup_steps=0, initial_lr=0.0, cosine_decay=False, min_lr=0.0,
                    grad_clip=None, clip_during_warmup=False,
                    checkpoint_path=None, resume=False, checkpoint_metadata=None, save_every=None,
                    stop_at_step=None, metrics_path=None, progress=True)

What the caller brings
- `train_loader`: any re-iterable of batches with len() (a `data.DataLoader`, a list of
  (inputs, targets) tuples). One pass is one epoch.
- `loss_fn(model, batch) -> Tensor`: the scalar loss of one batch, with its graph (the
  model is in train mode). The loop calls `.backward()` on it.
- `evaluate() -> dict of floats` (optional): called after step s when s % eval_freq == 0
  (s counts from 0, as the book's global_step), in eval mode and under no_grad, e.g.
  {"train_loss": 2.1, "val_loss": 2.3}. `epoch_end(epoch) -> dict or None` (optional):
  called after each epoch (epoch counts from 1), in eval mode, under no_grad; the book's
  per-epoch accuracies, or a printed sample (return None: nothing is recorded).
- `seen`: what the records count: "tokens" (np.size of batch[0], chapter 5), "examples"
  (len(batch[0]), chapter 6) or a function batch -> int.
- `report(record) -> str or None`: the line printed for each record (default: every value).

What the loop does
- One step: zero the grads, then for each of `accumulation_steps` micro-batches the loss
  divided by their number, backward (the grads add up), so k micro-batches of B give the
  gradient of one batch of kB when the loss is a mean. An epoch's last step takes the
  micro-batches left over, averaged over their own number. Frozen parameters
  (requires_grad=False) get no .grad, and the optimizers skip them.
- Learning rate: the optimizer's is the peak; `warmup_steps` ramp from `initial_lr`, then
  `cosine_decay` lowers it to `min_lr` by the last step (optim.lr_at_step). `grad_clip`
  scales the gradients to that global L2 norm once step >= warmup_steps, as appendix D
  does; `clip_during_warmup=True` clips from the first step.
- Records: one dict per evaluation {"event": "eval", "step", "epoch", "<seen>_seen",
  "lr", "seconds", **evaluate()} and per epoch end ("event": "epoch", **epoch_end(...)).
  `history` (returned) is the list of every record in order, those of a resumed run
  included; with `metrics_path` each is also one JSON line of that file (rewritten from
  the history on resume, so it never holds steps the checkpoint did not keep).
- Checkpoints (`checkpoint_path`): the whole training state (weights, optimizer, generator
  states, data position, history, `checkpoint_metadata`) after every epoch, every
  `save_every` steps, at `stop_at_step` and on Ctrl-C / SIGTERM; `resume=True` continues
  from it and draws exactly the random numbers the uninterrupted run would have.
- Ctrl-C or SIGTERM stops after the current step, saves, and raises TrainingInterrupted
  (a KeyboardInterrupt; `.signum` says which); a second one stops at once. A NaN/inf loss
  raises TrainingDivergedError before the weights are touched, and weights gone NaN/inf
  are never saved, so the last checkpoint stays a good one.

Resuming bit for bit means the run after the checkpoint draws exactly the random numbers
(shuffling, dropout) the uninterrupted run would have. The checkpoint holds the generators'
states (tl.manual_seed's and a seeded loader's own) at the save and at the start of the
current epoch: on resume the epoch's batches are drawn again from the epoch-start states,
the ones already trained on are skipped, and the generators are then put back where the
save left them.

PPO, whose rollout-then-update is no loop over a loader, reuses the pieces: `set_lr`
(the schedule), `clip_gradients` (appendix D's rule), `save_training_state` /
`load_training_state`, `TrainingDivergedError` and `StopOnSignals`.
"""
import json
import math
import os
import signal
import threading
import time

import numpy as np
from tqdm.auto import tqdm

from . import backend, distributed, validation
from . import functional as F
from .checkpoint import check_train_state, load_checkpoint, read_checkpoint, save_checkpoint
from .generate import generate, text_to_token_ids, token_ids_to_text
from .model import GPTModel
from .optim import clip_grad_norm_, lr_at_step
from .tensor import Tensor, no_grad

IGNORE_INDEX = -100  # torch's default ignore_index: a target that adds nothing to the loss


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN or infinite; the message names the step."""


# ---- the book's chapter 5 functions -------------------------------------------------------


def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean cross-entropy of the next-token predictions of one batch (a Tensor, for backward).

    Targets of -100 (chapter 7's padding and masked instructions) count for nothing, so a
    GPTModel computes no logits for them (its `logits_at`): the same loss for less of the
    head's work, which is a third of GPT-2 124M's.
    """
    check_model_device(model, device)
    targets = target_batch.data if isinstance(target_batch, Tensor) else target_batch
    inputs = input_batch.data if isinstance(input_batch, Tensor) else input_batch
    if isinstance(model, GPTModel) and backend.device_of(targets) != "cuda":
        targets = np.asarray(targets)
        kept = targets != IGNORE_INDEX
        # Mis-shaped targets take the plain path, whose cross_entropy names both shapes.
        if 0 < kept.sum() < kept.size and kept.shape == np.shape(inputs):
            return F.cross_entropy(model(input_batch, logits_at=kept), targets[kept])
    logits = model(input_batch)  # (B, T, V)
    return F.cross_entropy(logits, target_batch)  # host targets are checked there, then copied once


def calc_loss_loader(data_loader, model, device, num_batches=None):
    """Average batch loss (a float) over the first `num_batches` batches (default all); NaN if empty."""
    if len(data_loader) == 0:
        return float("nan")
    if num_batches is not None:
        validation.integer("num_batches", num_batches, minimum=1)
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
    check_model_device(model, device)
    context_size = model.pos_emb.weight.shape[0]
    encoded = text_to_token_ids(start_context, tokenizer)
    token_ids = generate(model, encoded, max_new_tokens, context_size)
    tqdm.write(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))


def perplexity(loss):
    """exp(loss): the number of tokens the model is as unsure between as a uniform guess."""
    return math.exp(loss) if loss < 700 else float("inf")


def train_model_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                       start_context, tokenizer, **options):
    """The book's chapter 5 loop; returns (train_losses, val_losses, tokens_seen) at each evaluation.

    Every `eval_freq` steps the loss over `eval_iter` batches of each loader is printed
    with its perplexity; after each epoch a sample continuing `start_context` is printed
    (skipped when start_context or tokenizer is None). `options` are `train`'s keywords
    (appendix D's schedule and clipping, accumulation_steps, checkpoint_path, resume,
    save_every, metrics_path, ...).
    """
    def loss_fn(model, batch):
        return calc_loss_batch(*batch, model, device)

    def evaluate():
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter)
        return {"train_loss": train_loss, "val_loss": val_loss}

    def epoch_end(epoch):
        if start_context is not None and tokenizer is not None:
            generate_and_print_sample(model, tokenizer, device, start_context)

    def report(record):
        if record["event"] == "eval":
            return (f"Ep {record['epoch']} (Step {record['step']:06d}): "
                    f"Train loss {record['train_loss']:.3f} (ppl {perplexity(record['train_loss']):.1f}), "
                    f"Val loss {record['val_loss']:.3f} (ppl {perplexity(record['val_loss']):.1f})")
        return None

    history = train(model, optimizer, train_loader, loss_fn, num_epochs, evaluate=evaluate, eval_freq=eval_freq,
                    epoch_end=epoch_end, seen="tokens", report=report, **options)
    evals = [record for record in history if record["event"] == "eval"]
    return [r["train_loss"] for r in evals], [r["val_loss"] for r in evals], [r["tokens_seen"] for r in evals]


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped training after a finished step; the checkpoint, if any, is written."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum


SEEN_COUNTS = {"tokens": lambda batch: int(np.size(batch[0])), "examples": lambda batch: len(batch[0])}


def train(model, optimizer, train_loader, loss_fn, num_epochs, *, evaluate=None, eval_freq=1, epoch_end=None,
          seen="tokens", report=None, accumulation_steps=1, warmup_steps=0, initial_lr=0.0, cosine_decay=False,
          min_lr=0.0, grad_clip=None, clip_during_warmup=False, checkpoint_path=None, resume=False,
          checkpoint_metadata=None, save_every=None, stop_at_step=None, metrics_path=None, progress=True):
    """The one training loop (see the module docstring); returns the list of records."""
    _check_options(num_epochs, eval_freq, accumulation_steps, warmup_steps, grad_clip, save_every)
    if not callable(seen) and seen not in SEEN_COUNTS:
        raise ValueError(f"seen must be 'tokens', 'examples' or a function of a batch, got {seen!r}")
    count_seen, seen_key = (seen, "seen") if callable(seen) else (SEEN_COUNTS[seen], f"{seen}_seen")
    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise ValueError("the training loader yields no batches: there is too little data for one batch "
                         "(lower the batch size or the context length, or use drop_last=False)")
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation_steps)
    total_steps = num_epochs * steps_per_epoch
    schedule = (dict(total_steps=total_steps, warmup_steps=warmup_steps, initial_lr=initial_lr,
                     min_lr=min_lr if cosine_decay else None) if warmup_steps > 0 or cosine_decay else None)
    if resume:
        if checkpoint_path is None:
            raise ValueError("resume=True needs the checkpoint_path to resume from")
        # The saved position is checked against this run before any weight is loaded.
        check_train_state(read_checkpoint(checkpoint_path)["metadata"].get("train_state"), checkpoint_path,
                          batches_per_epoch, accumulation_steps, num_epochs)
        state = load_training_state(checkpoint_path, model, optimizer, train_loader)
    else:
        state = {"step": 0, "epoch": 0, "batch": 0, "seen": 0, "seconds": 0.0, "generators": None,
                 "epoch_generators": None, "peak_lrs": [group["lr"] for group in optimizer.param_groups],
                 "history": []}
    world = distributed.current()  # rank 0 of 1 unless mpiexec started several (distributed.py)
    if resume and world.size > 1:
        saved = state.get("rank_generators") or [None]
        if len(saved) != world.size:
            raise ValueError(f"{checkpoint_path} was saved by {len(saved)} rank(s), not {world.size}: resume it "
                             f"with as many")
        backend.set_rng_state(saved[world.rank])  # this rank's own dropout generator
    history = state["history"]
    log = _MetricsLog(metrics_path if world.rank == 0 else None, history)
    session_start, seconds_before, seen_before = time.perf_counter(), state["seconds"], state["seen"]

    def seconds():
        return seconds_before + time.perf_counter() - session_start

    def record(event, step, metrics):
        entry = {"event": event, "step": step, "epoch": state["epoch"] + 1, seen_key: state["seen"],
                 "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds(), 3), **metrics}
        history.append(entry)
        log.write(entry)
        line = (report or _describe)(entry)
        if line and world.rank == 0:
            tqdm.write(line)

    def save():
        if checkpoint_path is not None:
            state["seconds"] = seconds()
            if world.size > 1:
                state["rank_generators"] = world.gather(backend.get_rng_state())
            if world.rank == 0:
                save_training_state(checkpoint_path, model, optimizer, train_loader, state, checkpoint_metadata)

    with StopOnSignals() as stop, \
            tqdm(total=total_steps, initial=state["step"], disable=not progress or world.rank > 0, unit="step") as bar:
        while state["epoch"] < num_epochs:
            model.train()
            batches = _epoch_batches(train_loader, state)
            stopped_mid_epoch = False
            while state["batch"] < batches_per_epoch:
                global_step = state["step"]  # the book's 0-based step number
                if schedule is not None:
                    set_lr(optimizer, global_step, state["peak_lrs"], **schedule)
                optimizer.zero_grad()
                micro_batches = min(accumulation_steps, batches_per_epoch - state["batch"])
                losses = []
                for _ in range(micro_batches):
                    batch = next(batches)
                    loss = loss_fn(model, batch)
                    losses.append(loss.item())
                    if not math.isfinite(losses[-1]):
                        kept = f"; the last checkpoint {checkpoint_path} is kept" if checkpoint_path else ""
                        raise TrainingDivergedError(
                            f"training stopped: the loss is {losses[-1]} at step {global_step} (epoch "
                            f"{state['epoch'] + 1}, batch {state['batch'] + 1}){kept}; try a lower learning "
                            "rate, warmup or gradient clipping")
                    (loss if micro_batches == 1 else loss * (1.0 / micro_batches)).backward()
                    state["batch"] += 1
                    state["seen"] += count_seen(batch) * world.size  # every rank trains on as many rows
                world.allreduce_gradients(model.parameters())  # the global batch's gradient on every rank
                if grad_clip is not None:
                    clip_gradients(model.parameters(), grad_clip, global_step, warmup_steps, clip_during_warmup)
                optimizer.step()
                state["step"] += 1

                bar.update(1)
                rate = (state["seen"] - seen_before) / max(seconds() - seconds_before, 1e-9)
                bar.set_postfix({"loss": f"{sum(losses) / micro_batches:.3f}", f"{seen_key.split('_')[0]}/s": f"{rate:.0f}"})
                if evaluate is not None and global_step % eval_freq == 0:
                    with _evaluating(model):
                        record("eval", global_step, world.average(evaluate()))
                mid_epoch = state["batch"] < batches_per_epoch
                requested = world.agree(stop.requested)  # every rank stops after the same step
                if mid_epoch and (requested or state["step"] == stop_at_step):
                    stopped_mid_epoch = True
                    break
                if mid_epoch and save_every is not None and state["step"] % save_every == 0:
                    save()

            if not stopped_mid_epoch:
                if epoch_end is not None:
                    with _evaluating(model):
                        metrics = epoch_end(state["epoch"] + 1)
                    if metrics is not None:
                        record("epoch", state["step"] - 1, metrics)
                state["epoch"], state["batch"], state["epoch_generators"] = state["epoch"] + 1, 0, None
            save()
            requested = world.agree(stop.requested)
            if requested:
                raise TrainingInterrupted(f"training interrupted by {signal.Signals(requested).name} "
                                          f"after step {state['step'] - 1}", requested)
            if state["step"] == stop_at_step:
                break
    return history


def _check_options(num_epochs, eval_freq, accumulation_steps, warmup_steps, grad_clip, save_every):
    def whole(name, value, low):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")

    whole("num_epochs", num_epochs, 0)
    whole("eval_freq", eval_freq, 1)
    whole("accumulation_steps", accumulation_steps, 1)
    whole("warmup_steps", warmup_steps, 0)
    if save_every is not None:
        whole("save_every", save_every, 1)
    if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and 0 < grad_clip < math.inf):
        raise ValueError(f"grad_clip must be a positive number (the largest global gradient norm), got {grad_clip!r}")


def _describe(record):
    values = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                       for key, value in record.items() if key not in ("event", "epoch", "step", "seconds", "lr"))
    return f"Ep {record['epoch']} (Step {record['step']:06d}): {values}"


class _evaluating:
    """Eval mode and no graph for an evaluation; train mode again afterwards."""

    def __init__(self, model):
        self.model, self.no_grad = model, no_grad()

    def __enter__(self):
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train()


class _MetricsLog:
    """One JSON line per record; opened for a run, it first holds the history the run starts from."""

    def __init__(self, path, history):
        self.path = None if path is None else os.fspath(path)
        if self.path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(entry) + "\n" for entry in history)

    def write(self, entry):
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")


def read_metrics(path):
    """The records of a metrics log (one dict per line), e.g. to draw the loss and accuracy plots."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- the pieces of a step, public for loops of another shape (PPO) ----------------------------


def set_lr(optimizer, step, peak_lrs, total_steps, warmup_steps=0, initial_lr=0.0, min_lr=None):
    """Appendix D's learning rate of `step` in every parameter group (min_lr None: no decay after warmup)."""
    for group, peak_lr in zip(optimizer.param_groups, peak_lrs):
        group["lr"] = lr_at_step(step, peak_lr, total_steps, warmup_steps, initial_lr,
                                 peak_lr if min_lr is None else min_lr)


def clip_gradients(params, max_norm, step, warmup_steps=0, during_warmup=False):
    """Appendix D's clipping: the global L2 norm to `max_norm` once step >= warmup_steps (or always)."""
    if during_warmup or step >= warmup_steps:
        clip_grad_norm_(params, max_norm)


def save_training_state(path, model, optimizer, train_loader, state, metadata=None):
    """A checkpoint of the model, the optimizer, the generators and the loop's `state` (a JSON-able dict).

    Weights gone NaN/inf are refused (TrainingDivergedError), so the previous checkpoint stays.
    """
    if not all(bool(p.xp.isfinite(p.data).all()) for p in model.parameters()):
        raise TrainingDivergedError(f"training stopped: the weights are NaN/inf after step {state['step'] - 1}; "
                                    f"the last checkpoint {path} is kept")
    state["generators"] = _generator_states(train_loader)
    save_checkpoint(path, model, optimizer, train_state=state, **(metadata or {}))


def load_training_state(path, model, optimizer, train_loader=None):
    """Restore what save_training_state wrote; returns the loop's state with the generators put back."""
    state = load_checkpoint(path, model, optimizer)["train_state"]
    _set_generator_states(train_loader, state["generators"])
    return state


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


class StopOnSignals:
    """While active, Ctrl-C (SIGINT) or SIGTERM (what job schedulers send) asks the loop to stop
    after the current step: `.requested` holds the signal's number; a second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested, self.previous = 0, {}
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        tqdm.write(f"{name}: stopping after this step and writing a checkpoint (send it again to stop at once)")

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def check_model_device(model, device):
    """A ValueError when `device` (None, "cpu", "cuda", a torch.device ...) is not where the model is."""
    if device is not None and backend.check_device(device) != model.device:
        raise ValueError(f"the model is on {model.device!r} but device={device!r}: move it first with model.to({device!r})")


# ---- the book's loss plot -------------------------------------------------------------------


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path):
    """The book's figure: train and val loss against epochs, a second x axis of tokens seen; a PNG at `path`."""
    return plot_values(epochs_seen, tokens_seen, train_losses, val_losses, path)


def plot_values(epochs_seen, seen, train_values, val_values, path, label="loss", seen_label="Tokens seen"):
    """The book's plot_values (chapters 5 and 6): training and validation `label` against epochs, a
    second x axis of tokens or examples seen; an image at `path` (PNG, PDF, ... by its suffix)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise RuntimeError("the plots need matplotlib: pip install 'tinygrad_llm[plot]'") from error
    # A bare Figure draws without pyplot, so no GUI backend is touched and nothing global changes.
    fig = Figure(figsize=(5, 3))
    FigureCanvasAgg(fig)
    ax1 = fig.add_subplot()
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend(loc="best")
    ax2 = ax1.twiny()  # the same curve against what was seen, drawn invisibly to place the top axis
    ax2.plot(seen, train_values, alpha=0)
    ax2.set_xlabel(seen_label)
    fig.tight_layout()
    fig.savefig(path)
    return path
