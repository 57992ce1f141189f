"""Byte-level BPE encoding: the machinery a trained BPETokenizer and GPT-2's tokenizer share.

A regex first cuts the text into pieces (words, numbers, punctuation runs, spaces), so a
merge never crosses a word boundary. Each piece becomes its UTF-8 bytes, one token per
byte, and the merge loop then fuses, again and again, the adjacent pair that was learned
first, until no learned pair is left. Merges are numbered in the order they were
learned and a merge's number is the id of the token it makes, so "learned first" is
simply "smallest id". Text repeats its words, so each piece's ids are cached.
"""
import regex

# GPT-2's split pattern: contractions, letters, digits, other symbols (each run may
# take one leading space), then whitespace. The contractions share their apostrophe, as
# tiktoken writes them, which the regex module matches faster than GPT-2's original
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# and with the same pieces. "\s+(?!\S)" leaves the last space of a run to the next word.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

NO_MERGE = 1 << 62  # ranks above every token id
CACHE_LIMIT = 200_000  # cached pieces kept before the cache starts afresh


def apply_merges(ids, merges):
    """Merge a piece's token ids (a list, changed in place) with the learned `merges`.

    `merges` maps a pair of ids to the id of their merged token. Merging the leftmost
    lowest-ranked pair one at a time gives the same result as merging every occurrence
    at once, because a merge can only create pairs of a higher rank than its own.
    """
    rank_of = merges.get
    ranks = [rank_of(pair, NO_MERGE) for pair in zip(ids, ids[1:])]  # ranks[i]: ids[i], ids[i + 1]
    while ranks:
        new_id = min(ranks)
        if new_id == NO_MERGE:
            break
        i = ranks.index(new_id)
        ids[i] = new_id
        del ids[i + 1], ranks[i]
        if i > 0:
            ranks[i - 1] = rank_of((ids[i - 1], new_id), NO_MERGE)
        if i < len(ranks):
            ranks[i] = rank_of((new_id, ids[i + 1]), NO_MERGE)
    return ids


def special_token_regex(tokens):
    # Longest first, so a special token that contains another one wins.
    return regex.compile("|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True)))


class BytePairTokenizer:
    """Encodes text with learned byte-pair merges; decodes ids back to text.

    merges: {(left id, right id): merged id}, the merged ids above every byte's id.
    byte_ids: the token id of each byte value 0..255 (a permutation of 0..255).
    special_tokens: {text: id} for tokens such as <|endoftext|> that are never merged.
    """

    def __init__(self, merges, pattern=GPT2_SPLIT_PATTERN, special_tokens=None, byte_ids=range(256)):
        byte_ids = list(byte_ids)
        if sorted(byte_ids) != list(range(256)):
            raise ValueError("byte_ids must give each of the 256 byte values its own id in 0..255")
        self.merges = dict(merges)
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        self.byte_ids = byte_ids
        self.vocab = {token_id: bytes([byte]) for byte, token_id in enumerate(byte_ids)}
        for (left, right), token_id in sorted(self.merges.items(), key=lambda item: item[1]):
            if left not in self.vocab or right not in self.vocab or token_id in self.vocab:
                raise ValueError(f"merge ({left}, {right}) -> {token_id} must join two earlier "
                                 f"tokens into a new id")
            self.vocab[token_id] = self.vocab[left] + self.vocab[right]
        # A piece that is itself a token encodes to that token (the merges that built the
        # token rebuild it), so every such token starts out in the cache.
        self._seed_cache = {}
        for token_id, token in self.vocab.items():
            try:
                self._seed_cache[token.decode("utf-8")] = (token_id,)
            except UnicodeDecodeError:
                pass  # part of a multi-byte character: never a whole piece of text
        self.clear_cache()
        for text, token_id in self.special_tokens.items():
            if token_id in self.vocab:
                raise ValueError(f"special token {text!r} has id {token_id}, already taken")
            self.vocab[token_id] = text.encode("utf-8")
        self._split = regex.compile(pattern).findall
        self._byte_to_id = bytes(byte_ids)  # a bytes.translate table: byte value -> its id

    @property
    def n_vocab(self):
        return max(self.vocab) + 1

    def encode_piece(self, piece):
        """Token ids of one piece of text (a word as the split pattern cuts it)."""
        return tuple(apply_merges(list(piece.encode("utf-8").translate(self._byte_to_id)), self.merges))

    def clear_cache(self):
        """Forget the pieces encoded so far (the pieces that are tokens stay)."""
        self._cache = dict(self._seed_cache)

    def encode_ordinary(self, text):
        """Token ids of `text`, reading special tokens as plain text."""
        if len(self._cache) > CACHE_LIMIT:
            self.clear_cache()
        cache = self._cache
        ids = []
        try:
            for piece in self._split(text):
                piece_ids = cache.get(piece)
                if piece_ids is None:
                    piece_ids = cache[piece] = self.encode_piece(piece)
                ids += piece_ids
        except UnicodeEncodeError:  # lone surrogates: replaced by U+FFFD, as tiktoken does
            return self.encode_ordinary(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
        return ids

    def encode(self, text, *, allowed_special=frozenset(), disallowed_special="all"):
        """Token ids of `text`, with tiktoken's rules for special tokens.

        allowed_special: the special tokens to encode as such ("all" for every one);
            names this tokenizer does not have are ignored.
        disallowed_special: strings that raise ValueError if they appear in the text
            ("all": every special token that is not allowed; () turns the check off).
        """
        if isinstance(allowed_special, str) and allowed_special != "all":
            raise ValueError(f"allowed_special must be 'all' or a set of strings, got {allowed_special!r}")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        allowed &= self.special_tokens.keys()
        if disallowed_special == "all":
            disallowed_special = set(self.special_tokens) - allowed
        if disallowed_special and (found := special_token_regex(disallowed_special).search(text)):
            raise ValueError(
                f"the text contains the special token {found.group()!r}, which is not allowed: pass "
                f"allowed_special={{{found.group()!r}}} to encode it as a special token, or "
                f"disallowed_special=() to encode it as plain text")
        if not allowed:
            return self.encode_ordinary(text)
        ids = []
        start = 0
        for match in special_token_regex(allowed).finditer(text):
            ids += self.encode_ordinary(text[start:match.start()])
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        return ids + self.encode_ordinary(text[start:])

    def decode_bytes(self, ids):
        try:
            return b"".join(map(self.vocab.__getitem__, ids))
        except KeyError as error:
            raise ValueError(f"token id {error.args[0]!r} is not in the vocabulary "
                             f"(ids 0..{self.n_vocab - 1})") from None

    def decode(self, ids):
        """The text of token ids; bytes that are not valid UTF-8 become U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

