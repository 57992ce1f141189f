"""GPT-2's tokenizer, from scratch: GPT-2's own merges run by the shared byte-pair machinery.

The merges come from OpenAI's files, either encoder.json + vocab.bpe (GPT-2's original
release) or gpt2.tiktoken (the same vocabulary as tiktoken stores it). The ids it gives
are exactly tiktoken's: the tests check it on generated text.
"""
import functools
import json

from .. import datasets
from .byte_pair import END_OF_TEXT, GPT2_SPLIT_PATTERN, BytePairTokenizer, apply_merges

END_OF_TEXT_ID = 50256
# The pattern tiktoken 0.14 uses for GPT-2 (r50k_base); it matches what GPT2_SPLIT_PATTERN matches.
TIKTOKEN_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bytes_to_unicode():
    """GPT-2's map from each byte value to a printable character.

    encoder.json and vocab.bpe are text files, so GPT-2 writes a token's bytes as
    characters: the printable Latin-1 bytes stand for themselves, and the other bytes
    (control characters, space, ...) borrow the characters from U+0100 upwards, in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


class GPT2Tokenizer(BytePairTokenizer):
    """GPT-2's byte-level BPE (50,257 tokens, <|endoftext|> = 50256), with tiktoken's interface."""

    @classmethod
    def from_encoder_files(cls, encoder_json, vocab_bpe):
        """From GPT-2's original encoder.json (token text -> id) and vocab.bpe (the merges in order)."""
        with open(encoder_json, encoding="utf-8") as f:
            encoder = json.load(f)
        with open(vocab_bpe, encoding="utf-8") as f:
            merge_lines = f.read().split("\n")[1:]  # line 0 is "#version: 0.2"
        byte_to_char = bytes_to_unicode()
        char_to_byte = {char: byte for byte, char in byte_to_char.items()}
        merges = {}
        for line in filter(None, merge_lines):
            left, right = line.split(" ")
            merges[encoder[left], encoder[right]] = encoder[left + right]
        tokenizer = cls(merges, GPT2_SPLIT_PATTERN, {END_OF_TEXT: encoder[END_OF_TEXT]},
                        byte_ids=[encoder[byte_to_char[b]] for b in range(256)])
        for text, token_id in encoder.items():
            if text != END_OF_TEXT and tokenizer.vocab[token_id] != bytes(char_to_byte[c] for c in text):
                raise ValueError(f"{encoder_json} and {vocab_bpe} disagree on token {token_id} ({text!r})")
        return tokenizer

    @classmethod
    def from_tiktoken_file(cls, path):
        """From a .tiktoken file: each token's bytes (base64) and rank, which is its id.

        The file lists tokens, not merges. A token's merge is found by running BPE on its
        bytes with the merges of lower rank: it stops at the two tokens that merge into it.
        """
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(path), expected_hash=datasets.get("gpt2-tiktoken").sha256)
        byte_ids = [ranks[bytes([b])] for b in range(256)]
        byte_to_id = bytes(byte_ids)
        merges = {}
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            if len(token) > 1:
                left, right = apply_merges(list(token.translate(byte_to_id)), merges)
                merges[left, right] = rank
        return cls(merges, GPT2_SPLIT_PATTERN, {END_OF_TEXT: END_OF_TEXT_ID}, byte_ids=byte_ids)


def get_gpt2_tokenizer(backend="scratch"):
    """GPT-2's tokenizer, loaded once and then shared.

    backend="scratch": this package's GPT2Tokenizer on GPT-2's encoder.json and vocab.bpe.
    backend="tiktoken": tiktoken's Encoding (see tiktoken_gpt2).
    Both give the same ids and take the same encode/decode arguments.
    """
    if backend not in ("scratch", "tiktoken"):
        raise ValueError(f"unknown backend {backend!r}: expected 'scratch' or 'tiktoken'")
    return _load(backend)


@functools.cache
def _load(backend):
    if backend == "tiktoken":
        return tiktoken_gpt2()
    return GPT2Tokenizer.from_encoder_files(datasets.path("gpt2-encoder"), datasets.path("gpt2-vocab"))


def tiktoken_gpt2():
    """tiktoken's GPT-2 Encoding, built offline from the local gpt2.tiktoken when the
    registry finds one, else tiktoken's own get_encoding("gpt2") (which downloads)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    local = datasets.local_path("gpt2-tiktoken")
    if local is None:
        return tiktoken.get_encoding("gpt2")
    ranks = load_tiktoken_bpe(str(local), expected_hash=datasets.get("gpt2-tiktoken").sha256)
    return tiktoken.Encoding("gpt2", pat_str=TIKTOKEN_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={END_OF_TEXT: END_OF_TEXT_ID}, explicit_n_vocab=50257)
