"""A byte-level BPE tokenizer trained from scratch, as in the book's chapter 2 bonus.

Training starts from the 256 byte values and repeatedly merges the most frequent pair of
adjacent tokens into a new token. Pair counts are kept up to date as merges happen: a
merge only touches the words that hold the pair, so nothing is recounted from scratch.
"""
import json
from collections import Counter, defaultdict
from pathlib import Path

import regex

from .byte_pair import GPT2_SPLIT_PATTERN, BytePairTokenizer

FORMAT_HEADER = "tinygrad_llm bpe v1"


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
        special_tokens = list(special_tokens)
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is too small: the bytes and "
                             f"{len(special_tokens)} special tokens need {256 + len(special_tokens)}")
        word_counts = Counter(regex.findall(pattern, text))
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
        """Write the tokenizer as text: a header, then one merge per line in learning order.

        Each merge line reads "left right", then a tab and the merged token for people.
        """
        lines = [FORMAT_HEADER,
                 f"pattern {json.dumps(self.pattern)}",
                 f"special_tokens {json.dumps(self.special_tokens)}"]
        for (left, right), token_id in sorted(self.merges.items(), key=lambda item: item[1]):
            readable = self.vocab[token_id].decode("utf-8", errors="replace")
            lines.append(f"{left} {right}\t{json.dumps(readable)}")
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path):
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        if len(lines) < 3 or lines[0] != FORMAT_HEADER:
            raise ValueError(f"{path} is not a saved BPETokenizer: its first line should be {FORMAT_HEADER!r}")
        try:
            pattern = json.loads(lines[1].removeprefix("pattern "))
            special_tokens = json.loads(lines[2].removeprefix("special_tokens "))
            merges = {}
            for new_id, line in enumerate(lines[3:], start=256):
                left, right = line.split("\t")[0].split()
                merges[int(left), int(right)] = new_id
        except ValueError as error:
            raise ValueError(f"{path} is a damaged BPETokenizer file: {error}") from None
        return cls(merges, pattern, special_tokens)
