"""Classification fine-tuning (the book's chapter 6): a GPT that tells spam from ham.

The data: the SMS Spam Collection (5,572 messages) through the registry, balanced to the
747 spam and as many ham messages drawn as pandas' `sample(747, random_state=123)` draws
them, shuffled and split 70/10/20 as the book's `random_split`: the same 1,045 / 149 / 300
rows, in the same order. `SpamDataset` tokenizes them and pads to the longest training
text (120 tokens). The model: a GPT whose output head becomes `Linear(emb_dim, 2)`, with
everything frozen but the last block and the final norm (`prepare_classifier`, or the
book's three lines of attribute code). The class is read from the logits of one position:

    token="last"       the last position (the book's choice; a pad for every shorter text)
    token="last-real"  the last real token, the book's bonus "flexible" variant:
                       position (ids != pad_token_id).sum() - 1
    token="mean"       the mean over all positions (the book's bonus mean pooling)

`train_classifier_simple` is the book's loop over `train.train`, with its counting
(examples seen, steps from 0) and its per-epoch accuracies.
"""
import csv
import os

import numpy as np

from .. import backend, datasets
from .. import functional as F
from ..nn import Linear
from ..tensor import no_grad
from ..train import check_model_device, plot_values, read_metrics, train

LABELS = {"ham": 0, "spam": 1}
CLASS_NAMES = ("not spam", "spam")  # what classify_review returns for class 0 and 1
TOKENS = ("last", "last-real", "mean")
TRAINABLE = ("head", "last-block", "last-2", "all")


# ---- data ----------------------------------------------------------------------------------


def load_sms_spam(path=None):
    """[(label, text)] of the SMS Spam Collection (default: the registry's file), label "ham" or "spam".

    The file is read as the book's `pd.read_csv(sep="\\t", header=None)` reads it, quotes
    included: a text that starts with a double quote is a quoted field (which may run over
    a line end, and "" inside it is one quote), so the rows are the book's 5,572.
    """
    path = datasets.path("sms-spam-collection") if path is None else path
    with open(path, encoding="utf-8", newline="") as f:
        records = _read_delimited(f.read(), "\t")
    rows = []
    for line, fields in records:
        if len(fields) != 2 or fields[0] not in LABELS:
            raise ValueError(f"{path}, record starting on line {line}: expected a label (ham or spam), a tab and "
                             f"a text, got {fields[:3]!r}")
        rows.append((fields[0], fields[1]))
    return rows


def _read_delimited(text, delimiter):
    """(first line number, fields) of each record, as pandas' C tokenizer splits them (quotechar '"').

    A field that starts with a quote runs to the next lone quote, over line ends; "" within it
    is a quote; characters after the closing quote join the field. A quote later in a field
    is an ordinary character. Empty lines are skipped.
    """
    records, fields, field = [], [], []
    line, record_line, i, n = 1, 1, 0, len(text)
    while i < n:
        c = text[i]
        if not field and c == '"':  # a quoted field: to the closing quote
            i += 1
            while i < n:
                if text[i] == '"':
                    if text[i + 1:i + 2] == '"':
                        field.append('"')
                        i += 2
                        continue
                    i += 1
                    break
                line += text[i] == "\n"
                field.append(text[i])
                i += 1
            field.append("")  # a quoted empty field is still a field
            continue
        if c == delimiter:
            fields.append("".join(field))
            field = []
        elif c in "\r\n":
            if c == "\r" and text[i + 1:i + 2] == "\n":
                i += 1
            if fields or field:
                records.append((record_line, fields + ["".join(field)]))
            fields, field = [], []
            line += 1
            record_line = line
        else:
            field.append(c)
        i += 1
    if fields or field:
        records.append((record_line, fields + ["".join(field)]))
    return records


def create_balanced_dataset(rows, seed=123):
    """The book's balancing: as many ham rows as there are spam, drawn as pandas' sample(n, random_state=seed)
    draws them, then every spam row in file order (747 + 747 rows for the SMS collection)."""
    ham = [row for row in rows if row[0] == "ham"]
    spam = [row for row in rows if row[0] == "spam"]
    if len(ham) < len(spam):
        raise ValueError(f"create_balanced_dataset needs at least as many ham rows as spam rows, "
                         f"got {len(ham)} ham and {len(spam)} spam")
    # pandas' sample draws np.random.RandomState(seed).choice(n, size, replace=False)
    chosen = np.random.RandomState(seed).choice(len(ham), size=len(spam), replace=False)
    return [ham[i] for i in chosen] + spam


def random_split(rows, train_frac, validation_frac, seed=123):
    """The book's split: shuffled as pandas' sample(frac=1, random_state=seed), then the first
    int(n * train_frac) rows, the next int(n * validation_frac), and the rest (1,045 / 149 / 300)."""
    if not (0 <= train_frac and 0 <= validation_frac and train_frac + validation_frac <= 1):
        raise ValueError(f"random_split needs fractions >= 0 that sum to at most 1, got train {train_frac} "
                         f"and validation {validation_frac}")
    order = np.random.RandomState(seed).choice(len(rows), size=len(rows), replace=False)
    shuffled = [rows[i] for i in order]
    train_end = int(len(rows) * train_frac)
    validation_end = train_end + int(len(rows) * validation_frac)
    return shuffled[:train_end], shuffled[train_end:validation_end], shuffled[validation_end:]


def _label_id(label, where):
    if isinstance(label, str) and label.strip() in LABELS:
        return LABELS[label.strip()]
    if isinstance(label, str) and label.strip() in ("0", "1"):
        return int(label)
    if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and label in (0, 1):
        return int(label)
    raise ValueError(f"{where}: unknown label {label!r}; expected ham / spam or 0 / 1")


def _read_csv(path):
    """(label, text) rows of the book's train.csv / validation.csv / test.csv (columns Label and Text)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [column for column in ("Label", "Text") if column not in columns]
        if missing:
            raise ValueError(f"{path} has no {' and no '.join(missing)} column: expected the book's CSV with a "
                             f"header 'Label,Text', got columns {columns}")
        return [(row["Label"], row["Text"]) for row in reader]


class SpamDataset:
    """The book's dataset: item i is (token ids int64 (max_length,), label 0 or 1).

    rows_or_csv_path: [(label, text)] rows (labels ham / spam or 0 / 1), or the path of a
    CSV as the book writes it (columns Label and Text). max_length None: the longest encoded
    text (120 for the book's training set); given, longer texts are cut to it, as the book
    does. Texts are padded on the right with pad_token_id.
    """

    def __init__(self, rows_or_csv_path, tokenizer, max_length=None, pad_token_id=50256):
        if isinstance(rows_or_csv_path, (str, os.PathLike)):
            source = os.fspath(rows_or_csv_path)
            rows = _read_csv(source)
        else:
            source, rows = "rows", list(rows_or_csv_path)
        if not rows:
            raise ValueError(f"SpamDataset: {source} holds no rows")
        self.labels = []
        self.encoded_texts = []
        for i, row in enumerate(rows):
            label, text = row
            where = f"{source}, row {i + 1}"
            self.labels.append(_label_id(label, where))
            if not isinstance(text, str) or not text:
                raise ValueError(f"{where}: the text is empty; every row needs a text to classify")
            self.encoded_texts.append(tokenizer.encode(text))
        longest = max(len(ids) for ids in self.encoded_texts)
        if max_length is None:
            self.max_length = longest
        else:
            if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
                raise ValueError(f"SpamDataset: max_length must be a whole number >= 1, got {max_length!r}")
            shortest = min(len(ids) for ids in self.encoded_texts)
            if shortest > max_length:
                raise ValueError(f"SpamDataset: every text of {source} is longer than max_length={max_length} "
                                 f"tokens (the shortest has {shortest}), so all would be cut; use a larger "
                                 "max_length, or None for the longest text")
            self.max_length = int(max_length)
            self.encoded_texts = [ids[:self.max_length] for ids in self.encoded_texts]
        self.pad_token_id = pad_token_id
        self.encoded_texts = [ids + [pad_token_id] * (self.max_length - len(ids)) for ids in self.encoded_texts]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return np.asarray(self.encoded_texts[index], dtype=np.int64), self.labels[index]


# ---- the model -----------------------------------------------------------------------------


def prepare_classifier(model, num_classes=2, trainable="last-block", seed=123):
    """The book's surgery, in place: freeze every parameter, a new head Linear(emb_dim, num_classes)
    drawn after tl.manual_seed(seed) (None: from the generator as it stands), then unfreeze

        "head"        the new head only
        "last-block"  the last transformer block and the final norm (the book's chapter 6)
        "last-2"      the last two blocks and the final norm
        "all"         everything

    Returns the model.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    for p in model.parameters():
        p.requires_grad = False
    if seed is not None:
        backend.manual_seed(seed)
    model.out_head = Linear(model.cfg["emb_dim"], num_classes, dtype=model.dtype).to(device=model.device)
    blocks = list(model.trf_blocks)
    unfrozen = {"head": [], "last-block": [*blocks[-1:], model.final_norm],
                "last-2": [*blocks[-2:], model.final_norm], "all": [model]}[trainable]
    for module in unfrozen:
        for p in module.parameters():
            p.requires_grad = True
    return model


def class_logits(model, input_batch, token="last", pad_token_id=50256):
    """The (B, num_classes) logits a classifier reads: of the last position, the last real token or the mean."""
    if token not in TOKENS:
        raise ValueError(f"token must be one of {', '.join(TOKENS)}, got {token!r}")
    ids = np.asarray(backend.to_host(input_batch))
    logits = model(ids)  # (B, T, num_classes)
    if token == "last":
        return logits[:, -1, :]
    if token == "mean":
        return logits.mean(axis=1)
    # the last position that is not a pad (the first position when a row is all pads)
    last_real = np.maximum((ids != pad_token_id).sum(axis=1) - 1, 0)
    return logits[np.arange(len(ids)), last_real, :]


# ---- the book's chapter 6 functions -----------------------------------------------------------


def calc_loss_batch(input_batch, target_batch, model, device, token="last", pad_token_id=50256):
    """Cross-entropy of the class logits of one batch (a Tensor, for backward)."""
    check_model_device(model, device)
    targets = backend.to_device(np.asarray(backend.to_host(target_batch), dtype=np.int64), model.device)
    return F.cross_entropy(class_logits(model, input_batch, token, pad_token_id), targets)


def _first_batches(data_loader, num_batches):
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    for i, batch in enumerate(data_loader):
        if i >= num_batches:
            break
        yield batch


def calc_loss_loader(data_loader, model, device, num_batches=None, token="last", pad_token_id=50256):
    """Average batch loss (a float) over the first `num_batches` batches (default all); NaN if empty."""
    if len(data_loader) == 0:
        return float("nan")
    losses = []
    with no_grad():
        for input_batch, target_batch in _first_batches(data_loader, num_batches):
            losses.append(calc_loss_batch(input_batch, target_batch, model, device, token, pad_token_id).item())
    return sum(losses) / len(losses)


def calc_accuracy_loader(data_loader, model, device, num_batches=None, token="last", pad_token_id=50256):
    """Share of correct predictions over the first `num_batches` batches (default all), in eval mode as the book.

    As the book's, it leaves the model in eval mode; NaN for an empty loader."""
    check_model_device(model, device)
    model.eval()
    correct, examples = 0, 0
    with no_grad():
        for input_batch, target_batch in _first_batches(data_loader, num_batches):
            predicted = backend.to_host(class_logits(model, input_batch, token, pad_token_id).data).argmax(axis=-1)
            correct += int((predicted == np.asarray(backend.to_host(target_batch))).sum())
            examples += len(predicted)
    return correct / examples if examples else float("nan")


def evaluate_model(model, train_loader, val_loader, device, eval_iter, token="last", pad_token_id=50256):
    """(train loss, val loss) over `eval_iter` batches each, in eval mode (no dropout)."""
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, eval_iter, token, pad_token_id)
    val_loss = calc_loss_loader(val_loader, model, device, eval_iter, token, pad_token_id)
    model.train()
    return train_loss, val_loss


def train_classifier_simple(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                            token="last", pad_token_id=50256, **options):
    """The book's loop: returns (train_losses, val_losses, train_accs, val_accs, examples_seen).

    Losses every `eval_freq` steps over `eval_iter` batches; accuracies after each epoch over
    `eval_iter` batches; `examples_seen` counts the training examples. `options` are
    `train.train`'s keywords (accumulation_steps, warmup, clipping, checkpoint_path, resume,
    save_every, metrics_path, progress, ...).
    """
    def loss_fn(model, batch):
        return calc_loss_batch(*batch, model, device, token, pad_token_id)

    def evaluate():
        train_loss, val_loss = evaluate_model(model, train_loader, val_loader, device, eval_iter, token, pad_token_id)
        return {"train_loss": train_loss, "val_loss": val_loss}

    def epoch_end(epoch):
        return {"train_accuracy": calc_accuracy_loader(train_loader, model, device, eval_iter, token, pad_token_id),
                "val_accuracy": calc_accuracy_loader(val_loader, model, device, eval_iter, token, pad_token_id)}

    def report(record):
        if record["event"] == "eval":
            return (f"Ep {record['epoch']} (Step {record['step']:06d}): "
                    f"Train loss {record['train_loss']:.3f}, Val loss {record['val_loss']:.3f}")
        return (f"Training accuracy: {record['train_accuracy'] * 100:.2f}% | "
                f"Validation accuracy: {record['val_accuracy'] * 100:.2f}%")

    history = train(model, optimizer, train_loader, loss_fn, num_epochs, evaluate=evaluate, eval_freq=eval_freq,
                    epoch_end=epoch_end, seen="examples", report=report, **options)
    evals = [r for r in history if r["event"] == "eval"]
    epochs = [r for r in history if r["event"] == "epoch"]
    examples_seen = history[-1]["examples_seen"] if history else 0
    return ([r["train_loss"] for r in evals], [r["val_loss"] for r in evals],
            [r["train_accuracy"] for r in epochs], [r["val_accuracy"] for r in epochs], examples_seen)


def classify_review(text, model, tokenizer, device, max_length=None, pad_token_id=50256, token="last"):
    """"spam" or "not spam" for one text, as the book's: cut to max_length (and the context), padded to it.

    max_length None: the text as it is (cut to the context length), no padding.
    """
    check_model_device(model, device)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("classify_review: the text is empty; give a message to classify")
    num_classes = model.out_head.weight.shape[0]
    if num_classes != 2:
        raise ValueError(f"classify_review needs a classifier with a 2-class output head (model.out_head = "
                         f"Linear(emb_dim, 2), as prepare_classifier makes); this model's head has {num_classes} "
                         "outputs")
    context_length = model.pos_emb.weight.shape[0]
    limit = context_length if max_length is None else min(max_length, context_length)
    input_ids = tokenizer.encode(text)[:limit]
    if max_length is not None:
        input_ids += [pad_token_id] * (limit - len(input_ids))
    model.eval()
    with no_grad():
        logits = class_logits(model, np.asarray([input_ids], dtype=np.int64), token, pad_token_id)
    return CLASS_NAMES[int(backend.to_host(logits.data).argmax(axis=-1)[0])]



def plot_classifier_metrics(metrics, folder):
    """The book's figures 6.16 and 6.17 from a metrics log (a path or its records): loss-plot.png
    and accuracy-plot.png in `folder`, against epochs and examples seen; returns their paths."""
    records = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else metrics
    evals = [r for r in records if r["event"] == "eval"]
    epochs = [r for r in records if r["event"] == "epoch"]
    if not evals or not epochs:
        return []
    per_epoch = epochs[0]["examples_seen"] / epochs[0]["epoch"]  # examples in one epoch
    paths = []
    for label, rows, key in (("loss", evals, "loss"), ("accuracy", epochs, "accuracy")):
        seen = [r["examples_seen"] for r in rows]
        path = os.path.join(folder, f"{label}-plot.png")
        paths.append(plot_values([n / per_epoch for n in seen], seen, [r[f"train_{key}"] for r in rows],
                                 [r[f"val_{key}"] for r in rows], path, label=label, seen_label="Examples seen"))
    return paths


def load_classifier(path, dtype=None):
    """A classifier saved by `tinygrad-llm finetune classify` (or any checkpoint whose metadata holds
    "classifier": {"num_classes", "token", "max_length", "pad_token_id", "lora"}): (model, that dict)."""
    from ..checkpoint import load_checkpoint, read_checkpoint
    from ..model import GPTModel

    info = read_checkpoint(path)
    settings = info["metadata"].get("classifier")
    if settings is None:
        raise ValueError(f"{path} is not a classifier checkpoint (its metadata has no 'classifier'): "
                         "make one with `tinygrad-llm finetune classify`")
    dtype = info["tensors"]["model.tok_emb.weight"][1] if dtype is None else dtype
    model = GPTModel(info["config"], dtype=dtype, init_weights=False)
    prepare_classifier(model, settings["num_classes"], trainable="head", seed=None)
    if settings.get("lora"):
        from ..lora import replace_linear_with_lora

        replace_linear_with_lora(model, settings["lora"]["rank"], settings["lora"]["alpha"])
    load_checkpoint(path, model)
    model.eval()
    return model, settings
