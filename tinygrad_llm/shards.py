"""Token shards on disk: a corpus tokenized once, in several processes, then read memory-mapped.

`prepare(data, out)` tokenizes every text file under `data` (one document per file, in
sorted path order, <|endoftext|> between documents) with GPT-2's tokenizer and writes the
token stream in pieces of `shard_tokens` uint16 ids (GPT-2's 50,257 ids fit in 16 bits):

    OUT/shard_00000.npy  OUT/shard_00001.npy  ...   (NumPy .npy files, read with mmap_mode="r")
    OUT/index.json       the shards in order, each with its token count and sha256, the
                         tokenizer, and a fingerprint of the input (each file's path, size
                         and modification time) and of the settings

The index is rewritten after every shard, so an interrupted run resumes after the last
shard it wrote, and a run over an input the index already holds in full writes nothing.

`ShardDataset(out, max_length, stride)` gives the windows of the token stream exactly as
`data.GPTDatasetV1` gives those of the concatenated text ("<|endoftext|>".join(documents)),
reading only the windows a batch needs, so a corpus larger than memory trains.
"""
import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .checkpoint import atomic_write
from .tokenizers import get_gpt2_tokenizer

FORMAT = "tinygrad_llm shards v1"
INDEX_NAME = "index.json"
TOKENIZER = "gpt2"
END_OF_TEXT_ID = 50256
DEFAULT_SHARD_TOKENS = 50_000_000  # 100 MB per shard


class ShardError(ValueError):
    """A shard folder that cannot be used as it is; the message names the file."""


def documents(data):
    """The text files of `data` (a file, or a folder searched recursively), in sorted path order.
    Hidden files and folders (a leading ".") are skipped."""
    data = Path(data)
    if data.is_file():
        return [data]
    if not data.is_dir():
        raise ShardError(f"{data} is neither a file nor a folder")
    files = sorted(path for path in data.rglob("*") if path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(data).parts))
    if not files:
        raise ShardError(f"{data} holds no files: prepare needs at least one text file (one document per file)")
    return files


def fingerprint(files, shard_tokens):
    """What makes two runs of prepare the same: every input file's path, size and mtime, and the settings."""
    entries = [[str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns] for path in files]
    settings = {"tokenizer": TOKENIZER, "shard_tokens": shard_tokens, "files": entries}
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()


def _encode_document(path):
    """One document's ids as uint16 (in a worker process)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ShardError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); prepare reads text "
                         "files only") from None
    ids = get_gpt2_tokenizer().encode(text, allowed_special={"<|endoftext|>"})
    return np.asarray(ids, dtype=np.uint16)


def prepare(data, out, shard_tokens=DEFAULT_SHARD_TOKENS, processes=None, progress=True):
    """Tokenize `data` into shards in `out` (see the module docstring); returns the index (a dict).

    processes: worker processes that tokenize (default: the CPU count). A second call over
    the same input returns the index at once; a call after an interrupted one resumes.
    """
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ShardError(f"shard_tokens must be a whole number >= 1, got {shard_tokens!r}")
    files = documents(data)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} is a file, not a folder for shards")
    index = {"format": FORMAT, "tokenizer": TOKENIZER, "dtype": "uint16", "shard_tokens": shard_tokens,
             "fingerprint": fingerprint(files, shard_tokens), "documents": len(files), "tokens": 0,
             "shards": [], "complete": False, "next_document": 0, "next_offset": 0}
    if (out / INDEX_NAME).exists():
        saved = _read_json(out / INDEX_NAME)
        if saved.get("fingerprint") != index["fingerprint"]:
            raise ShardError(f"{out / INDEX_NAME} holds shards of another input or other settings: remove the "
                             f"folder or choose another --out")
        for shard in saved["shards"]:
            _verify_shard(out, shard)
        if saved["complete"]:
            return saved
        index = saved  # an interrupted run: continue after its last shard
    out.mkdir(parents=True, exist_ok=True)

    first = index["next_document"]
    pending = []  # token arrays not yet in a shard
    pending_tokens = 0
    with multiprocessing.get_context("spawn").Pool(processes or os.cpu_count()) as pool, \
            tqdm(total=len(files), initial=first, disable=not progress, unit="doc") as bar:
        encoded = pool.imap(_encode_document, [str(path) for path in files[first:]], chunksize=4)
        for document, ids in enumerate(encoded, start=first):
            if document < len(files) - 1:
                ids = np.append(ids, np.uint16(END_OF_TEXT_ID))
            skipped = index["next_offset"] if document == first else 0  # written by an interrupted run
            ids = ids[skipped:]
            pending.append(ids)
            pending_tokens += len(ids)
            while pending_tokens >= shard_tokens:
                stream = np.concatenate(pending)
                _write_shard(out, index, stream[:shard_tokens])
                pending, pending_tokens = [stream[shard_tokens:]], len(stream) - shard_tokens
                # What is left over is this document's tail (the rest fitted in the shard): the
                # next shard starts inside this document.
                index["next_document"], index["next_offset"] = document, skipped + len(ids) - pending_tokens
                _write_index(out, index)
            bar.update(1)
    if pending_tokens:
        _write_shard(out, index, np.concatenate(pending))
    index["complete"] = True
    del index["next_document"], index["next_offset"]
    _write_index(out, index)
    return index


def _write_shard(out, index, tokens):
    name = f"shard_{len(index['shards']):05d}.npy"
    atomic_write(out / name, lambda tmp: _save_npy(tmp, tokens))
    index["shards"].append({"name": name, "tokens": int(len(tokens)), "sha256": _sha256(out / name)})
    index["tokens"] += int(len(tokens))


def _save_npy(path, tokens):
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(tokens, dtype=np.uint16), allow_pickle=False)


def _write_index(out, index):
    text = json.dumps(index, indent=1)
    atomic_write(out / INDEX_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path):
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardError(f"{path} is not a shard index (not JSON: {error})") from None
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise ShardError(f"{path} is not a shard index: its format should be {FORMAT!r}")
    return value


def _verify_shard(out, shard):
    path = Path(out) / shard["name"]
    if not path.is_file():
        raise ShardError(f"{out / INDEX_NAME} names the shard {shard['name']}, which is missing from {out}")
    if _sha256(path) != shard["sha256"]:
        raise ShardError(f"shard {path} fails its sha256 check (the index says {shard['sha256'][:16]}...): "
                         "it was damaged or replaced; run prepare again into a new folder")


def is_shard_folder(path):
    return (Path(path) / INDEX_NAME).is_file()


def read_index(folder, verify=True):
    """The index of a complete shard folder, each shard checked to exist (and its sha256, with verify)."""
    folder = Path(folder)
    if not (folder / INDEX_NAME).is_file():
        raise ShardError(f"{folder} holds no {INDEX_NAME}: make shards with tinygrad-llm prepare")
    index = _read_json(folder / INDEX_NAME)
    if not index.get("complete"):
        raise ShardError(f"{folder / INDEX_NAME} belongs to an unfinished prepare: run it again to finish")
    for shard in index["shards"]:
        if verify:
            _verify_shard(folder, shard)
        elif not (folder / shard["name"]).is_file():
            raise ShardError(f"{folder / INDEX_NAME} names the shard {shard['name']}, which is missing from {folder}")
    return index


class ShardDataset:
    """The (input, target) windows of a shard folder's token stream, as GPTDatasetV1 makes them.

    Window i starts at token start + i * stride of the stream; `start`/`stop` (token
    positions) select a part of the stream, e.g. a train/val split. The shards are
    memory-mapped: a batch reads its windows' pages and nothing else.
    """

    def __init__(self, folder, max_length, stride, start=0, stop=None, verify=True):
        if max_length < 1 or stride < 1:
            raise ValueError(f"max_length and stride must be at least 1, got {max_length} and {stride}")
        index = read_index(folder, verify)
        self.folder = Path(folder)
        self.shards = []
        for shard in index["shards"]:
            tokens = np.load(self.folder / shard["name"], mmap_mode="r", allow_pickle=False)
            if tokens.dtype != np.uint16 or tokens.shape != (shard["tokens"],):
                raise ShardError(f"shard {self.folder / shard['name']} holds {tokens.dtype} {tokens.shape}, but the "
                                 f"index says uint16 ({shard['tokens']},)")
            self.shards.append(tokens)
        self.shard_starts = np.cumsum([0] + [len(tokens) for tokens in self.shards])  # (n_shards + 1,)
        stop = int(self.shard_starts[-1]) if stop is None else stop
        n_tokens = stop - start
        if n_tokens < max_length + 1:
            raise ValueError(f"{self.folder} gives {n_tokens} tokens here, too few for one window: max_length="
                             f"{max_length} needs at least {max_length + 1} tokens")
        self.max_length, self.start, self.stride = max_length, start, stride
        # The book's range(start, stop - max_length, stride), as GPTDatasetV1, kept as a range:
        # an array of window starts would take 8 bytes per window of a corpus larger than memory.
        self.starts = range(start, stop - max_length, stride)

    def __len__(self):
        return len(self.starts)

    def tokens(self, start, stop):
        """Tokens [start, stop) of the stream as int64, across shard boundaries."""
        first = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - int(self.shard_starts[first])
            piece = self.shards[first][offset:offset + stop - start]
            pieces.append(piece)
            start += len(piece)
            first += 1
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i):
        window = self.tokens(self.starts[i], self.starts[i] + self.max_length + 1)
        return window[:-1], window[1:]

    def batch(self, indices):
        """Inputs and targets of the windows `indices`, stacked: two (len(indices), max_length) arrays."""
        starts = self.start + np.asarray(indices, dtype=np.int64) * self.stride
        windows = np.stack([self.tokens(int(s), int(s) + self.max_length + 1) for s in starts])
        return windows[:, :-1], windows[:, 1:]
