"""Instruction fine-tuning (the book's chapter 7): Alpaca prompts, the masked collate, responses, evaluation.

An entry is a dict {"instruction", "input", "output"}. The model learns to continue the
Alpaca prompt of `format_input(entry)` with "\\n\\n### Response:\\n" and the output, then an
end-of-text token. `custom_collate_fn` pads a batch with that token (50256) and shifts the
targets one position left; in the targets only the first pad stays (the model must learn to
stop), every later one becomes -100, which cross-entropy ignores. Exercise 7.2's option
also ignores the prompt's tokens, so the loss counts only the response.

After training, `generate_responses` answers the test entries (greedy, batched, stopping at
the end token) and the responses are scored two ways: offline, by the test loss and
perplexity and by exact match and token-F1 against the reference outputs; and, as the book
does, by a larger model as judge (`generate_model_scores`, through Ollama: see judge.py).
"""
import json
import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from functools import partial

import numpy as np
from tqdm.auto import tqdm

from .. import backend, datasets
from ..data import DataLoader
from ..generate import generate
from ..lora import replace_linear_with_lora
from ..model import MultiHeadAttention
from ..nn import Dropout
from ..optim import AdamW
from ..train import calc_loss_loader, train_model_simple
from .judge import DEFAULT_MODEL, DEFAULT_TIMEOUT, DEFAULT_URL, JudgeError, JudgeUnavailableError, parse_score, query_model

PROMPT_HEAD = ("Below is an instruction that describes a task. "
               "Write a response that appropriately completes the request.")
RESPONSE_HEAD = "\n\n### Response:\n"


def format_input(entry):
    """The book's Alpaca prompt: the preamble, the instruction, and the input when there is one."""
    instruction_text = f"{PROMPT_HEAD}\n\n### Instruction:\n{entry['instruction']}"
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def load_instruction_data(path=None):
    """The entries of an instruction data file (default: the registry's `instruction-data`), checked.

    Every entry must be an object with string "instruction" and "output" ("input" may be
    missing or empty); the first one that is not is named in the error.
    """
    path = datasets.path("instruction-data") if path is None else path
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"instruction data file {path} is empty: expected a JSON list of "
                         "{\"instruction\", \"input\", \"output\"} entries")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"instruction data file {path} is not valid JSON: {error}") from None
    return check_instruction_data(data, source=path)


def check_instruction_data(data, source="instruction data", keys=("instruction", "output")):
    """`data` itself when it is a non-empty list of entries holding string `keys`; else a ValueError."""
    if not isinstance(data, list) or not data:
        raise ValueError(f"{source} must be a non-empty JSON list of {{\"instruction\", \"input\", \"output\"}} "
                         f"entries, got {type(data).__name__} of length {len(data) if hasattr(data, '__len__') else '?'}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: entry {i} is a {type(entry).__name__}, expected an object with "
                             f"{', '.join(repr(k) for k in keys)}")
        for key in keys:
            if not isinstance(entry.get(key), str):
                found = "missing" if key not in entry else f"a {type(entry[key]).__name__}"
                raise ValueError(f"{source}: entry {i} has no string {key!r} ({found}); its keys are {sorted(entry)}")
        if not isinstance(entry.get("input", ""), str):
            raise ValueError(f"{source}: entry {i} has an 'input' that is a {type(entry['input']).__name__}, "
                             "expected a string")
    return data


def split_instruction_data(data, train_frac=0.85, test_frac=0.1):
    """The book's split, in order and unshuffled: (train, test, val); 935 / 110 / 55 of 1,100 entries."""
    train_portion = int(len(data) * train_frac)
    test_portion = int(len(data) * test_frac)
    train_data = data[:train_portion]
    test_data = data[train_portion:train_portion + test_portion]
    val_data = data[train_portion + test_portion:]
    return train_data, test_data, val_data


class InstructionDataset:
    """Each entry's prompt and response as token ids (no end token: the collate adds it).

    Item i is a list of ids, as the book's; with mask_instruction=True it is
    (instruction_length, ids), exercise 7.2's pair, where instruction_length counts the
    tokens of format_input(entry) alone.
    """

    def __init__(self, data, tokenizer, mask_instruction=False):
        self.data = data
        self.mask_instruction = mask_instruction
        self.encoded_texts, self.instruction_lengths = [], []
        for entry in data:
            prompt = format_input(entry)
            self.encoded_texts.append(tokenizer.encode(prompt + RESPONSE_HEAD + entry["output"]))
            if mask_instruction:
                self.instruction_lengths.append(len(tokenizer.encode(prompt)))

    def __getitem__(self, index):
        if self.mask_instruction:
            return self.instruction_lengths[index], self.encoded_texts[index]
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, device="cpu",
                      mask_instruction=False):
    """A batch of token-id lists -> (inputs, targets), int64 arrays (B, T), the book's rules.

    Each item gets one pad_token_id appended and is padded with it to the longest item + 1;
    inputs drop the last position, targets the first. In each row of the targets every
    pad_token_id after the first becomes ignore_index. With mask_instruction, items are
    (instruction_length, ids) pairs and the first instruction_length - 1 targets (those
    predicting the prompt's tokens after its first) are ignore_index too. Both are then cut
    to allowed_max_length positions.
    """
    if mask_instruction:
        if not all(isinstance(item, tuple) and len(item) == 2 for item in batch):
            raise ValueError("custom_collate_fn(mask_instruction=True) expects (instruction_length, ids) items, "
                             "as InstructionDataset(..., mask_instruction=True) gives them")
        instruction_lengths = [length for length, _ in batch]
        batch = [ids for _, ids in batch]
    batch_max_length = max(len(item) + 1 for item in batch)
    padded = np.full((len(batch), batch_max_length), pad_token_id, dtype=np.int64)
    for row, item in zip(padded, batch):
        row[:len(item)] = item
    inputs, targets = padded[:, :-1], padded[:, 1:].copy()  # (B, batch_max_length - 1) each
    is_pad = targets == pad_token_id
    targets[is_pad & (is_pad.cumsum(axis=1) > 1)] = ignore_index  # every pad but the first of each row
    if mask_instruction:
        for row, length in zip(targets, instruction_lengths):
            row[:length - 1] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return (backend.to_device(np.ascontiguousarray(inputs), device),
            backend.to_device(np.ascontiguousarray(targets), device))


def instruction_loader(data, tokenizer, batch_size=8, shuffle=False, drop_last=False, mask_instruction=False,
                       allowed_max_length=1024, pad_token_id=50256, seed=None):
    """A DataLoader of (inputs, targets) batches of entries `data`, through the book's collate.

    The book's loaders: the training split shuffled with drop_last (935 entries: 116 batches
    of 8), validation and test in order, keeping the last smaller batch.
    """
    collate = partial(custom_collate_fn, pad_token_id=pad_token_id, allowed_max_length=allowed_max_length,
                      mask_instruction=mask_instruction)
    dataset = InstructionDataset(data, tokenizer, mask_instruction=mask_instruction)
    return DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate, seed=seed)


def create_instruction_loaders(train_data, val_data, tokenizer, batch_size=8, shuffle=True, seed=None, **options):
    """(train_loader, val_loader) as the book builds them; `options` go to instruction_loader."""
    train_loader = instruction_loader(train_data, tokenizer, batch_size, shuffle=shuffle, drop_last=True, seed=seed,
                                      **options)
    return train_loader, instruction_loader(val_data, tokenizer, batch_size, **options)


def split_loss(model, data, tokenizer, batch_size=8, mask_instruction=False, allowed_max_length=1024):
    """{"loss", "perplexity"} of the model on entries `data` (the test split, say), in batches of the book's collate."""
    loader = instruction_loader(data, tokenizer, batch_size, mask_instruction=mask_instruction,
                                allowed_max_length=allowed_max_length)
    loss = calc_loss_loader(loader, model, device=None)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


# ---- training ----------------------------------------------------------------------------------


def set_drop_rate(model, rate):
    """Every dropout of the model at `rate`: the book fine-tunes GPT-2 with drop_rate 0.0, though
    OpenAI's config (which the loaded weights bring) says 0.1."""
    for _, module in model.modules():
        if isinstance(module, Dropout):
            module.p = rate
        elif isinstance(module, MultiHeadAttention):
            module.dropout = rate
    model.cfg["drop_rate"] = rate
    return model


def finetune_instruct(model, train_loader, val_loader, num_epochs=2, lr=5e-5, weight_decay=0.1, eval_freq=5,
                      eval_iter=5, start_context=None, tokenizer=None, lora_rank=None, lora_alpha=None,
                      **train_options):
    """Chapter 7's fine-tune through the one loop: (train_losses, val_losses, tokens_seen) at each evaluation.

    The book's settings are the defaults: AdamW with lr 5e-5 and weight decay 0.1, 2
    epochs, the losses of 5 batches of each loader every 5 steps, and the loss of a batch
    is chapter 5's mean next-token cross-entropy over the targets the collate kept. After
    each epoch the model's response to `start_context` (the book: format_input(val_data[0]))
    is printed. With `lora_rank`, every weight is frozen and every Linear gets appendix E's
    adapter (alpha defaults to the rank), which alone is trained. `train_options` are
    train()'s: accumulation_steps, checkpoint_path, resume, metrics_path, grad_clip, ...
    """
    if lora_rank is not None:
        for p in model.parameters():
            p.requires_grad = False
        replace_linear_with_lora(model, lora_rank, lora_rank if lora_alpha is None else lora_alpha)
    optimizer = AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return train_model_simple(model, train_loader, val_loader, optimizer, None, num_epochs, eval_freq, eval_iter,
                              start_context, tokenizer, **train_options)


# ---- responses ---------------------------------------------------------------------------------


def extract_response(generated_text, input_text):
    """The book's: the text after the prompt, without the "### Response:" header, stripped."""
    return generated_text[len(input_text):].replace("### Response:", "").strip()


def generate_responses(model, tokenizer, entries, max_new_tokens=256, batch_size=8, eos_id=50256,
                       context_size=None, progress=True):
    """The model's response to each entry's prompt (a list of str), as the book generates them:
    greedy, at most max_new_tokens, stopping at eos_id. Prompts of similar length share a
    batch (fewer pads); each response is the one its prompt gets alone."""
    context_size = model.cfg["context_length"] if context_size is None else context_size
    prompts = [format_input(entry) for entry in entries]
    prompt_ids = [np.array(tokenizer.encode(prompt, allowed_special={"<|endoftext|>"})) for prompt in prompts]
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]))
    responses = [None] * len(prompts)
    batches = [by_length[start:start + batch_size] for start in range(0, len(by_length), batch_size)]
    for batch in tqdm(batches, desc="Generating responses", unit="batch", disable=not progress):
        outputs = generate(model, [prompt_ids[i] for i in batch], max_new_tokens, context_size, eos_id=eos_id)
        for i, token_ids in zip(batch, outputs):
            responses[i] = extract_response(tokenizer.decode(token_ids.tolist()), prompts[i])
    return responses


def write_responses(path, entries, responses, json_key="model_response"):
    """The book's instruction-data-with-response.json: each entry with its response under `json_key`."""
    with_responses = [{**entry, json_key: response} for entry, response in zip(entries, responses, strict=True)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(with_responses, f, indent=4)
    return path


def load_responses(path, json_key="model_response"):
    """The entries of a responses file, each checked to hold instruction, output and `json_key`."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"responses file {path} is empty: expected the JSON list write_responses writes")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"responses file {path} is not valid JSON: {error}") from None
    return check_instruction_data(data, source=str(path), keys=("instruction", "output", json_key))


# ---- offline metrics ---------------------------------------------------------------------------


def normalize_answer(text):
    """SQuAD's normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction, reference):
    """1.0 when the two texts are equal after normalize_answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction, reference):
    """SQuAD's token F1: the harmonic mean of the precision and recall of the shared (normalised) words."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def response_metrics(entries, json_key="model_response"):
    """{"exact_match", "token_f1", "count"}: the means over entries of their response against their output."""
    pairs = [(entry[json_key], entry["output"]) for entry in entries]
    return {"exact_match": float(np.mean([exact_match(p, r) for p, r in pairs])),
            "token_f1": float(np.mean([token_f1(p, r) for p, r in pairs])),
            "count": len(pairs)}


# ---- the judge ---------------------------------------------------------------------------------


def judge_prompt(entry, json_key="model_response"):
    """The book's judge prompt: score the response from 0 to 100 given the prompt and the correct output."""
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry[json_key]}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def rubric_judge_prompt(entry, json_key="model_response"):
    """A judge prompt with a 1-5 rubric: each score has a meaning, which makes a judge's scores steadier."""
    return (f"You are a fair judge of answers to instructions. Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, rate the model response `{entry[json_key]}` "
            "on this scale:\n"
            "1: it does not follow the instruction, or it is wrong\n"
            "2: it follows the instruction but is mostly wrong or incomplete\n"
            "3: it is partly correct, with clear errors or omissions\n"
            "4: it is correct, with small flaws in content or wording\n"
            "5: it is correct, complete and well phrased\n"
            "Respond with the integer number only.")


JUDGE_PROMPTS = {"book": (judge_prompt, (0, 100)), "rubric": (rubric_judge_prompt, (1, 5))}


@dataclass
class JudgeReport:
    """The judge's score of each entry (None where it gave none) and the reason of each failure."""
    scores: list
    scale: tuple
    failures: list = field(default_factory=list)  # (entry index, reason)

    @property
    def scored(self):
        return [score for score in self.scores if score is not None]

    @property
    def mean(self):
        return float(np.mean(self.scored)) if self.scored else float("nan")

    def summary(self):
        low, high = self.scale
        return (f"average score {self.mean:.2f} (scale {low}-{high}) over {len(self.scored)} of "
                f"{len(self.scores)} entries; {len(self.failures)} not scored")


def judge_responses(entries, json_key="model_response", model=DEFAULT_MODEL, url=DEFAULT_URL, prompt="book",
                    timeout=DEFAULT_TIMEOUT, progress=True):
    """Ask the judge to score every entry's response: a JudgeReport.

    An answer that is not one integer on the scale, a timeout or a broken connection costs
    that entry only: it is recorded in the report and the others are still scored. When
    the very first request finds no judge at all (nothing listening, an HTTP error such as
    an unknown model), JudgeUnavailableError is raised at once, as every entry would fail alike.
    """
    if prompt not in JUDGE_PROMPTS:
        raise ValueError(f"unknown judge prompt {prompt!r}: expected one of {sorted(JUDGE_PROMPTS)}")
    build_prompt, (low, high) = JUDGE_PROMPTS[prompt]
    report = JudgeReport(scores=[], scale=(low, high))
    for i, entry in enumerate(tqdm(entries, desc="Scoring entries", disable=not progress)):
        try:
            reply = query_model(build_prompt(entry, json_key), model=model, url=url, timeout=timeout)
        except JudgeError as error:
            if i == 0 and isinstance(error, JudgeUnavailableError):
                raise
            score, reason = None, str(error)
        else:
            score = parse_score(reply, low, high)
            reason = None if score is not None else f"could not convert score: {reply!r}"
        report.scores.append(score)
        if reason is not None:
            report.failures.append((i, reason))
    return report


def generate_model_scores(json_data, json_key, model=DEFAULT_MODEL, url=DEFAULT_URL, prompt="book",
                          timeout=DEFAULT_TIMEOUT):
    """The book's function: the judge's integer scores of the entries it could score (the others skipped, named)."""
    report = judge_responses(json_data, json_key, model=model, url=url, prompt=prompt, timeout=timeout)
    for index, reason in report.failures:
        tqdm.write(f"entry {index}: {reason}")
    return report.scored
