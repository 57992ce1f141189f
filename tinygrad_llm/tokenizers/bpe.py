"""A byte-level BPE tokenizer trained from scratch, as in the book's chapter 2 bonus.

Training starts from the 256 byte values and repeatedly merges the most frequent pair of
adjacent tokens into a new token. Pair counts are kept up to date as merges happen: a
merge only touches the words that hold the pair, so nothing is recounted from scratch.
"""
import json
from collections import Counter, defaultdict
from pathlib import Path

from .byte_pair import GPT2_SPLIT_PATTERN, BytePairTokenizer, check_special_token, compile_split_pattern

FORMAT_HEADER = "tinygrad_llm bpe v2"
FORMAT_V1 = "tinygrad_llm bpe v1"  # as v2 without the "merges N" line; still read


def merge_pair(ids, pair, new_id):
    """Every occurrence of `pair` in `ids` replaced by `new_id`, left to right."""
    merged = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


class BPETokenizer(BytePairTokenizer):
    """Byte-level BPE: ids 0..255 are the bytes, then one id per merge, then the special tokens."""

    @classmethod
    def train(cls, text, vocab_size, pattern=GPT2_SPLIT_PATTERN, special_tokens=()):
        """Learn merges on `text` until the vocabulary holds `vocab_size` tokens.

        vocab_size counts the 256 bytes, the merges and the special tokens. Training
        stops early when no pair of tokens is left to merge. Of two equally frequent
        pairs the one with the smaller ids is merged first, so training is deterministic.
        """
        if isinstance(special_tokens, str):
            raise ValueError(f"special_tokens must be a list of strings, not the string {special_tokens!r}")
        special_tokens = list(special_tokens)
        for token in special_tokens:
            check_special_token(token, 0)
        if len(set(special_tokens)) < len(special_tokens):
            repeated = next(t for t in special_tokens if special_tokens.count(t) > 1)
            raise ValueError(f"special token {repeated!r} is listed twice")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}")
        split = compile_split_pattern(pattern).findall
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is too small: the bytes and "
                             f"{len(special_tokens)} special tokens need {256 + len(special_tokens)}")
        word_counts = Counter(split(text))
        words = [list(word.encode("utf-8")) for word in word_counts]
        counts = list(word_counts.values())
        pair_counts = Counter()
        words_with_pair = defaultdict(set)
        for w, (ids, count) in enumerate(zip(words, counts)):
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += count
                words_with_pair[pair].add(w)

        merges = {}
        for new_id in range(256, 256 + n_merges):
            if not pair_counts:
                break
            best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
            merges[best] = new_id
            # Take the words holding the pair out of the counts, merge, and put them back.
            for w in words_with_pair.pop(best):
                ids, count = words[w], counts[w]
                for pair in zip(ids, ids[1:]):
                    pair_counts[pair] -= count
                    if not pair_counts[pair]:
                        del pair_counts[pair]
                words[w] = ids = merge_pair(ids, best, new_id)
                for pair in zip(ids, ids[1:]):
                    pair_counts[pair] += count
                    words_with_pair[pair].add(w)
        first_special = 256 + len(merges)
        specials = {token: first_special + i for i, token in enumerate(special_tokens)}
        return cls(merges, pattern, specials)

    def save(self, path):
        """Write the tokenizer as text: a header, the merge count, then one merge per line in
        learning order. Each merge line reads "left right", then a tab and the merged token
        for people."""
        lines = [FORMAT_HEADER,
                 f"pattern {json.dumps(self.pattern)}",
                 f"special_tokens {json.dumps(self.special_tokens)}",
                 f"merges {len(self.merges)}"]
        for (left, right), token_id in sorted(self.merges.items(), key=lambda item: item[1]):
            readable = self.vocab[token_id].decode("utf-8", errors="replace")
            lines.append(f"{left} {right}\t{json.dumps(readable)}")
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path):
        """Read a file written by save(). A damaged file (cut off, edited by hand) raises
        ValueError naming the file and the line, rather than encoding differently."""
        return cls(*read_tokenizer_file(path))


def read_tokenizer_file(path):
    """(merges, pattern, special_tokens) of a saved BPETokenizer, every line checked.

    The ids follow train()'s layout: the 256 bytes, then one id per merge in file order,
    then the special tokens. So each merge joins two earlier tokens, and the special
    tokens take exactly the ids after the last merge: a file cut off at a line end, which
    the merge count also catches, would otherwise shift them.
    """
    def damaged(line_number, problem):
        return ValueError(f"{path}, line {line_number}: {problem}")

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a saved BPETokenizer: it is not UTF-8 text") from None
    lines = text.split("\n")
    if lines[0] not in (FORMAT_HEADER, FORMAT_V1):
        raise ValueError(f"{path} is not a saved BPETokenizer: its first line should be {FORMAT_HEADER!r}")
    if lines[-1]:
        raise damaged(len(lines), "the file ends in the middle of this line: it was cut off")
    lines = lines[:-1]
    header_lines = 4 if lines[0] == FORMAT_HEADER else 3
    if len(lines) < header_lines:
        raise damaged(len(lines) + 1, "the file ends before its header does: it was cut off")

    pattern = _json_after(lines[1], "pattern", str, damaged(2, "expected pattern \"<a JSON string>\""))
    try:
        compile_split_pattern(pattern)
    except ValueError as error:
        raise damaged(2, error) from None

    special_tokens = _json_after(lines[2], "special_tokens", dict,
                                 damaged(3, 'expected special_tokens {"<token>": id, ...}'))
    for token, token_id in special_tokens.items():
        try:
            check_special_token(token, token_id)
        except ValueError as error:
            raise damaged(3, error) from None

    merge_lines = lines[header_lines:]
    if header_lines == 4:
        count = lines[3].removeprefix("merges ")
        if not lines[3].startswith("merges ") or not count.isdigit():
            raise damaged(4, 'expected "merges <number of merge lines>"')
        if int(count) != len(merge_lines):
            raise damaged(4, f"announces {int(count)} merges but the file holds {len(merge_lines)}: "
                             f"it was cut off or edited")

    merges = {}
    line_of_merge = {}
    for line_number, (new_id, line) in enumerate(enumerate(merge_lines, start=256), start=header_lines + 1):
        ids = line.split("\t")[0].split(" ")
        if len(ids) != 2 or not all(i.isdigit() for i in ids):
            raise damaged(line_number, f"expected a merge \"left right\" of two token ids, got {line!r}")
        pair = left, right = int(ids[0]), int(ids[1])
        if left >= new_id or right >= new_id:
            raise damaged(line_number, f"the merge {left} {right} makes token {new_id}, so it may only "
                                       f"join tokens below {new_id}")
        if pair in merges:
            raise damaged(line_number, f"the merge {left} {right} repeats line {line_of_merge[pair]}")
        merges[pair] = new_id
        line_of_merge[pair] = line_number

    first_special = 256 + len(merges)
    expected_ids = range(first_special, first_special + len(special_tokens))
    if sorted(special_tokens.values()) != list(expected_ids):
        raise damaged(3, f"the special tokens have ids {sorted(special_tokens.values())}, but after the 256 "
                         f"bytes and {len(merges)} merges they take ids {list(expected_ids)}: "
                         f"the ids were edited or merges are missing")
    return merges, pattern, special_tokens


def _json_after(line, name, expected_type, error):
    """The JSON value after "name " on `line`, of `expected_type`; `error` otherwise.
    A JSON object that repeats a key is refused (json.loads would keep the last silently)."""
    def no_repeated_keys(pairs):
        keys = [key for key, _ in pairs]
        if len(set(keys)) < len(keys):
            raise ValueError("repeated key")
        return dict(pairs)

    if not line.startswith(name + " "):
        raise error
    try:
        value = json.loads(line[len(name) + 1:], object_pairs_hook=no_repeated_keys)
    except ValueError:
        raise error from None
    if not isinstance(value, expected_type):
        raise error
    return value
