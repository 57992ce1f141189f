"""Loaders: a torch-like DataLoader over any dataset, and the book's sliding-window windows for
next-token prediction, on plain NumPy arrays.

A text becomes one long list of token ids. Window i starts at token i * stride and holds
max_length ids; its target is the same window shifted one token to the right, so every
position learns to predict the token that follows it.
"""
import numpy as np

from . import backend, validation
from .tokenizers import get_gpt2_tokenizer


class GPTDatasetV1:
    """The (input, target) windows of a text: item i is two int64 arrays of max_length ids.

    tokenizer: anything with tiktoken's encode(text, allowed_special=...), such as
    get_gpt2_tokenizer() or a BPETokenizer; <|endoftext|> in the text is that token.
    """

    def __init__(self, txt, tokenizer, max_length, stride):
        max_length = validation.integer("max_length", max_length, minimum=1)
        stride = validation.integer("stride", stride, minimum=1)
        self.token_ids = np.asarray(tokenizer.encode(txt, allowed_special={"<|endoftext|>"}), dtype=np.int64)
        n_tokens = len(self.token_ids)
        if n_tokens < max_length + 1:  # a window and its target shifted by one
            raise ValueError(f"the text has {n_tokens} tokens, too few for one window: max_length="
                             f"{max_length} needs at least {max_length + 1} tokens")
        self.max_length = max_length
        # The book's range(0, len - max_length, stride): every target window stays in the text.
        self.starts = np.arange(0, n_tokens - max_length, stride)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        start = self.starts[i]
        return (self.token_ids[start:start + self.max_length].copy(),
                self.token_ids[start + 1:start + self.max_length + 1].copy())

    def batch(self, indices):
        """Inputs and targets of the windows `indices`, stacked: two (len(indices), max_length) arrays."""
        positions = self.starts[indices][:, None] + np.arange(self.max_length)
        return self.token_ids[positions], self.token_ids[positions + 1]


class DataLoader:
    """Batches of any dataset with len() and integer indexing, as torch.utils.data.DataLoader.

    DataLoader(dataset, batch_size=1, shuffle=False, drop_last=False, collate_fn=None, seed=None)

    Each pass over it is one epoch. `collate_fn(items) -> batch` joins the items of a batch;
    without one, items that are tuples become a tuple of stacked arrays (torch's
    default_collate, with NumPy: ints become an int64 array), and a dataset that has
    `batch(indices)` (GPTDatasetV1) builds the batch itself in one gather. With shuffle=True
    every epoch draws a new order: from the loader's own generator `.rng` when a seed is
    given (the same seed, the same epochs), else from tl.manual_seed's generator. The
    training loop saves and restores that state, so a resumed run shuffles as the
    uninterrupted one.
    """

    def __init__(self, dataset, batch_size=1, shuffle=False, drop_last=False, collate_fn=None, seed=None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.collate_fn = collate_fn
        self.rng = None if seed is None else np.random.default_rng(seed)

    def __len__(self):
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def __iter__(self):
        order = np.arange(len(self.dataset))
        if self.shuffle:
            (self.rng or backend.generator()).shuffle(order)
        for b in range(len(self)):
            indices = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.collate_fn is None and hasattr(self.dataset, "batch"):
                yield self.dataset.batch(indices)
            else:
                items = [self.dataset[int(i)] for i in indices]
                yield (self.collate_fn or default_collate)(items)


def default_collate(items):
    """A list of items -> one batch: tuples field by field, arrays and numbers stacked (ints as int64)."""
    first = items[0]
    if isinstance(first, tuple):
        return tuple(default_collate(list(field)) for field in zip(*items))
    if isinstance(first, (bool, np.bool_)):
        return np.asarray(items, dtype=bool)
    if isinstance(first, (int, np.integer)):
        return np.asarray(items, dtype=np.int64)
    return np.stack([np.asarray(item) for item in items])


def create_dataloader_v1(txt, batch_size=4, max_length=256, stride=128, shuffle=True,
                         drop_last=True, num_workers=0, seed=None, tokenizer=None):
    """The book's loader: (inputs, targets) int64 batches of shape (batch_size, max_length).

    tokenizer defaults to GPT-2's. num_workers is accepted for the book's signature; the
    batches are slices of one array, so they are made in this process.
    """
    if tokenizer is None:
        tokenizer = get_gpt2_tokenizer()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dataset = GPTDatasetV1(txt, tokenizer, max_length, stride)
    if drop_last and len(dataset) < batch_size:
        raise ValueError(f"the text gives {len(dataset)} windows, fewer than batch_size={batch_size}, "
                         "so drop_last=True leaves no batch: use a longer text, a smaller "
                         "batch_size or stride, or drop_last=False")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
