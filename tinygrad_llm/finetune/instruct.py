"""Instruction fine-tuning (the book's chapter 7): Alpaca prompts and the masked collate.

An entry is a dict {"instruction", "input", "output"}. The model learns to continue the
Alpaca prompt of `format_input(entry)` with "\\n\\n### Response:\\n" and the output, then an
end-of-text token. `custom_collate_fn` pads a batch with that token (50256) and shifts the
targets one position left; in the targets only the first pad stays (the model must learn to
stop), every later one becomes -100, which cross-entropy ignores. Exercise 7.2's option
also ignores the prompt's tokens, so the loss counts only the response.
"""
import json

import numpy as np

from .. import backend, datasets

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
