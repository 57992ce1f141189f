"""Byte-level BPE encoding: the machinery a trained BPETokenizer and GPT-2's tokenizer share.

A regex first cuts the text into pieces (words, numbers, punctuation runs, spaces), so a
merge never crosses a word boundary. Each piece becomes its UTF-8 bytes, one token per
byte, and the merge loop then fuses, again and again, the adjacent pair that was learned
first, until no learned pair is left. Merges are numbered in the order they were
learned and a merge's number is the id of the token it makes, so "learned first" is
simply "smallest id". Text repeats its words, so each piece's ids are cached. The new
pieces of a long text are merged all together in NumPy, the rest by loops in Python.
"""
import functools
import heapq

import numpy as np
import regex

# GPT-2's split pattern: contractions, letters, digits, other symbols (each run may
# take one leading space), then whitespace. The contractions share their apostrophe, as
# tiktoken writes them, which the regex module matches faster than GPT-2's original
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# and with the same pieces. "\s+(?!\S)" leaves the last space of a run to the next word.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

END_OF_TEXT = "<|endoftext|>"
NO_MERGE = 1 << 62  # ranks above every token id
MERGED_AWAY = -1  # marks a position whose token was merged into its left neighbour
# Pieces of up to this many bytes take the plain merge loop. Measured per piece, plain
# loop against rank buckets: 64 random letters 5.9 vs 6.9 us, 64 spaces 6.7 vs 9.0 us,
# but 64 repeated letters 69 vs 46 us; above it the plain loop falls behind fast.
SHORT_PIECE = 64
CACHE_LIMIT = 200_000  # cached pieces kept before the cache starts afresh
# A text with at least BATCH_MIN_PIECES new pieces of up to BATCH_PIECE_LIMIT bytes merges
# them all together in NumPy (merge_together), whose last HANDOFF_PIECES unfinished pieces
# go on in apply_merges. Measured against apply_merges one piece at a time, on pieces of
# the benchmark's text with and without spaces: 256 pieces take 0.8-1.0x as long together,
# 1,000 0.45-0.55x, all 6,700 (natural text) 0.41x and all 18,000 (no spaces) 0.33x; 300
# pieces of 256 bytes 0.45-0.55x, of 512 bytes 0.55-0.8x (the batch's time grows as n**2
# in a piece's length, the rank buckets' as n log n). Handing off at 16-64 pieces is alike.
BATCH_MIN_PIECES = 256
BATCH_PIECE_LIMIT = 256
HANDOFF_PIECES = 32
BATCH_MAX_PIECES = 65_536  # at most 16 MB of bytes together, some 25 bytes of arrays each
ID_LIMIT = 2**31 - 1  # ids are below it, so NumPy holds them as int32 (tiktoken's are 32-bit too)
NO_MERGE_32 = ID_LIMIT  # NO_MERGE in int32 arrays
SEPARATOR = ID_LIMIT  # the id after each piece in merge_together's array: it is in no pair


def apply_merges(ids, merges):
    """Merge a piece's token ids (a list) with the learned `merges`; returns the merged ids.

    `merges` maps a pair of ids to the id of their merged token. Each step merges the
    lowest-ranked pair, the leftmost of equals, as GPT-2 and tiktoken do. Short pieces (nearly
    all of natural text) take the plain loop, whose C-level min() beats the bookkeeping of
    the rank buckets below about SHORT_PIECE tokens; long ones take the buckets, whose time
    grows as n log n where the plain loop's grows as n**2.
    """
    if len(ids) <= SHORT_PIECE:
        return merge_lowest_first(ids, merges)
    return merge_by_rank_buckets(ids, merges)


def merge_lowest_first(ids, merges):
    """The merge loop as written: find the lowest-ranked pair, merge it, repeat. O(n**2).

    Changes `ids` in place and returns it.
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


def merge_by_rank_buckets(ids, merges):
    """The same merges in O(n log n): every occurrence of one rank at a time, lowest rank first.

    A merge makes a token whose id (its rank) is above the ranks of its parts, so every
    pair it creates has a higher rank than the merge itself. Hence, once the lowest rank
    present has been merged wherever it occurs, left to right, no pair of that rank or
    below is left or can appear: merging all occurrences of one rank, then the next rank
    up, is exactly the one-at-a-time loop. The tokens form a linked list over their first
    byte's position; `bucket[rank]` lists the positions where a pair of that rank starts,
    and a heap gives the lowest rank with a bucket. Entries go stale when a neighbour
    merges first; each is checked against the pair its rank stands for when its turn comes.
    Each merge does O(1) list work and at most two heap pushes: O(n log n) in all.

    Every bucket is in left-to-right order, so the leftmost of overlapping pairs ("aaa")
    merges first: a bucket is filled at the start (pairs of bytes, in order) or during the
    pass of the later-made of its two tokens (a pair needs both), and that pass walks its
    own bucket left to right, appending positions in order.

    Changes `ids` (it becomes scratch space) and returns a new list.
    """
    n = len(ids)
    rank_of = merges.get
    following = list(range(1, n + 1))  # position of the next token (n: none)
    preceding = list(range(-1, n - 1))  # position of the previous token (-1: none)
    bucket = {}  # rank -> positions where a pair of that rank starts
    pair_of = {}  # rank -> the pair it merges
    for position, pair in enumerate(zip(ids, ids[1:])):
        rank = rank_of(pair)
        if rank is not None:
            if rank not in bucket:
                bucket[rank], pair_of[rank] = [], pair
            bucket[rank].append(position)
    lowest_ranks = list(bucket)  # a heap of the ranks that have a bucket
    heapq.heapify(lowest_ranks)
    while lowest_ranks:
        rank = heapq.heappop(lowest_ranks)
        left, right = pair_of.pop(rank)
        for position in bucket.pop(rank):
            after_right = following[position]
            if ids[position] != left or after_right == n or ids[after_right] != right:
                continue  # stale: a neighbour merged first
            ids[position] = rank
            ids[after_right] = MERGED_AWAY
            after = following[position] = following[after_right]
            before = preceding[position]
            # The two new pairs, each into its bucket (written out twice: this loop is the hot path).
            if before >= 0:
                pair = (ids[before], rank)
                new_rank = rank_of(pair)
                if new_rank is not None:
                    if new_rank not in bucket:
                        bucket[new_rank], pair_of[new_rank] = [], pair
                        heapq.heappush(lowest_ranks, new_rank)
                    bucket[new_rank].append(before)
            if after < n:
                preceding[after] = position
                pair = (rank, ids[after])
                new_rank = rank_of(pair)
                if new_rank is not None:
                    if new_rank not in bucket:
                        bucket[new_rank], pair_of[new_rank] = [], pair
                        heapq.heappush(lowest_ranks, new_rank)
                    bucket[new_rank].append(position)
    return [token_id for token_id in ids if token_id != MERGED_AWAY]


class PairRanks:
    """The rank of many pairs of ids at once: the merges as a hash table in NumPy arrays.

    A dict answers one pair per Python call; merge_together asks for the ranks of
    thousands of pairs per step. A pair (left, right) is the key left * 2**32 + right, and
    Fibonacci hashing (multiply by 2**64 / golden ratio, keep the top bits) gives its
    slot in a table at most a quarter full. A key whose slot is taken goes to the next
    free slot (linear probing), so a lookup reads slots from the key's own until it finds
    the key (its rank) or an empty slot (no merge): about one pair in nine reads twice.
    Pairs of two byte ids, where every piece starts, are read from a plain 256 x 256 table.
    """
    MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
    EMPTY = np.uint64(2**64 - 1)  # no pair has this key: ids are below 2**31

    def __init__(self, merges):
        lefts = np.array([left for left, _ in merges], dtype=np.int64)
        rights = np.array([right for _, right in merges], dtype=np.int64)
        ranks = np.array(list(merges.values()), dtype=np.int32)
        keys = (lefts << 32 | rights).view(np.uint64)
        self.bits = max(2, (4 * len(keys)).bit_length())
        self.mask = (1 << self.bits) - 1
        self.keys = np.full(1 << self.bits, self.EMPTY)
        self.ranks = np.full(1 << self.bits, NO_MERGE_32, np.int32)
        slots = self.slot(keys)
        waiting = np.arange(len(keys))  # keys without a slot yet, in the merges' order
        while len(waiting):
            free = waiting[self.keys[slots[waiting]] == self.EMPTY]
            taken, first = np.unique(slots[free], return_index=True)  # one key per free slot
            self.keys[taken], self.ranks[taken] = keys[free[first]], ranks[free[first]]
            waiting = waiting[self.keys[slots[waiting]] != keys[waiting]]
            slots[waiting] = (slots[waiting] + 1) & self.mask
        self.byte_pairs = np.full(256 * 256, NO_MERGE_32, np.int32)  # [left * 256 + right]
        of_bytes = (lefts < 256) & (rights < 256)
        self.byte_pairs[lefts[of_bytes] * 256 + rights[of_bytes]] = ranks[of_bytes]

    def slot(self, keys):
        return ((keys * self.MULTIPLIER) >> np.uint64(64 - self.bits)).astype(np.intp)

    def __call__(self, left, right):
        """The rank of each pair (left[i], right[i]) of int32 id arrays; NO_MERGE_32 where none."""
        keys = (left.astype(np.int64) << 32 | right).view(np.uint64)
        slots = self.slot(keys)
        found_keys = self.keys[slots]
        ranks = np.where(found_keys == keys, self.ranks[slots], NO_MERGE_32)
        unsure = np.flatnonzero((found_keys != keys) & (found_keys != self.EMPTY))  # another key's slot
        while len(unsure):
            slots[unsure] = (slots[unsure] + 1) & self.mask
            found_keys = self.keys[slots[unsure]]
            found = found_keys == keys[unsure]
            ranks[unsure[found]] = self.ranks[slots[unsure[found]]]
            unsure = unsure[~found & (found_keys != self.EMPTY)]
        return ranks


def merge_together(byte_ids, lengths, merges, pair_ranks, handoff=HANDOFF_PIECES):
    """apply_merges of many pieces at once, in NumPy: each piece's merged ids, a tuple.

    byte_ids: the pieces' byte ids end to end (a bytes object); lengths: each piece's
    length (1 or more); pair_ranks: the PairRanks of `merges`.

    The pieces lie in one array of ids, each followed by SEPARATOR, and `ranks[i]` is
    the rank of the pair that starts at i. Each round every piece merges its lowest
    rank wherever it occurs, at once: by merge_by_rank_buckets's argument that is exactly
    one-at-a-time BPE, and a piece's rounds are those of its own merges alone, so the
    pieces do not interfere. (Merging every pair that is lower than both its neighbours
    would not be BPE: a merge makes new pairs whose rank can be lower than a pair
    farther on, which BPE must then merge first.) A round costs a few passes over the
    ids still unfinished, 5-7 ns per id, and 0.1-0.15 us per merge for its new pairs'
    lookups and updates, against about 1 us per merge in the Python loops. Finished
    pieces (no pair left) leave the array once they are an eighth of the pieces, and
    once only `handoff` pieces remain, each finishes in apply_merges (whose state is just
    the ids): a round's NumPy calls cost tens of microseconds however few pieces are left.

    Merging more per round can be exact too: a piece's pairs that have no lower-ranked
    neighbour pair, up to the lowest rank that does have one, when none of the pairs
    they make ranks below them (else the lowest rank alone). On the benchmark's text
    without spaces that cut the rounds from 68 to 20, but its extra lookups and
    bookkeeping per merge made it slower (108 ms against 96 ms), so it is not used.
    """
    ids, ranks, lengths = _pieces_end_to_end(byte_ids, lengths, pair_ranks)
    n_pieces = len(lengths)
    starts = np.cumsum(lengths) - lengths
    unfinished = np.arange(n_pieces)  # the piece each entry of `lengths` and `starts` is
    finished = []  # (piece numbers, their lengths, their ids end to end), a batch each
    while len(unfinished) > handoff:
        lowest = np.minimum.reduceat(ranks, starts)
        done = lowest == NO_MERGE_32
        lowest[done] = -1  # matches no rank, so a finished piece merges nothing
        at = _leftmost_of_overlapping_pairs(np.flatnonzero(ranks == np.repeat(lowest, lengths)))
        ids[at] = ranks[at]
        alive = np.ones(len(ids), bool)
        alive[at + 1] = False  # the right token of each merged pair
        _update_ranks_around_merges(ids, ranks, at, pair_ranks)
        if np.count_nonzero(done) * 8 >= len(done):
            in_done_piece = np.repeat(done, lengths)
            finished.append((unfinished[done], lengths[done], ids[in_done_piece]))
            alive &= ~in_done_piece
            lengths, unfinished, starts = lengths[~done], unfinished[~done], starts[~done]
        lengths = lengths - np.diff(np.searchsorted(at, starts), append=len(at))  # less each piece's merges
        ids, ranks = ids[alive], ranks[alive]
        starts = np.cumsum(lengths) - lengths
    finished.append((unfinished, lengths, ids))
    merged = [None] * n_pieces
    for numbers, piece_lengths, piece_ids in finished:
        piece_ids = piece_ids.tolist()
        end = 0
        for number, length in zip(numbers.tolist(), piece_lengths.tolist()):
            merged[number] = tuple(piece_ids[end:end + length - 1])  # without the separator
            end += length
    for number in unfinished.tolist():
        merged[number] = tuple(apply_merges(list(merged[number]), merges))
    return merged


def _pieces_end_to_end(byte_ids, lengths, pair_ranks):
    """(ids, ranks, lengths) for merge_together: the pieces' ids end to end, each piece
    followed by SEPARATOR; the rank of the pair that starts at each id (NO_MERGE_32 at a
    piece's last id and at a separator); each piece's length with its separator."""
    lengths = np.asarray(lengths, dtype=np.intp)
    byte_values = np.frombuffer(byte_ids, np.uint8).astype(np.intp)
    ranks = np.full(len(byte_values), NO_MERGE_32, np.int32)
    ranks[:-1] = pair_ranks.byte_pairs[byte_values[:-1] * 256 + byte_values[1:]]
    piece_ends = np.cumsum(lengths)
    ranks[piece_ends - 1] = NO_MERGE_32
    ids = np.insert(byte_values.astype(np.int32), piece_ends, SEPARATOR)
    return ids, np.insert(ranks, piece_ends, NO_MERGE_32), lengths + 1


def _leftmost_of_overlapping_pairs(at):
    """The positions of `at` (sorted) that BPE merges when it merges the pairs at all of them.

    Pairs of one rank overlap only in a run of equal ids ("aaaa": pairs at 0, 1, 2);
    BPE merges the run's first pair, then its third, and so on.
    """
    overlapping = np.flatnonzero(at[1:] == at[:-1] + 1) + 1  # entries whose left neighbour merges too
    if not len(overlapping):
        return at
    run_starts = np.ones(len(overlapping), bool)
    run_starts[1:] = overlapping[1:] != overlapping[:-1] + 1
    order = np.arange(len(overlapping))
    offset = order - np.maximum.accumulate(np.where(run_starts, order, 0))  # 0 for a run's 2nd pair
    keep = np.ones(len(at), bool)
    keep[overlapping[offset % 2 == 0]] = False
    return at[keep]


def _update_ranks_around_merges(ids, ranks, at, pair_ranks):
    """The ranks of the two new pairs of each merged token at `at`, before the compaction.

    The merged token at p is followed by the token at p + 2 (p + 1 is gone, and p + 1
    does not merge when p does), and preceded by p - 1. When p - 1 is gone too (p - 2
    merged), the pair before p is p - 2's pair after, and the rank written at p - 1 is
    dropped with it. Either neighbour may be a separator, whose pairs have no rank.
    """
    with_left = at[at > 0]
    pair_starts = np.concatenate([at, with_left - 1])
    ranks[pair_starts] = pair_ranks(ids[pair_starts], ids[np.concatenate([at + 2, with_left])])


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
        self._split = compile_split_pattern(pattern).findall
        byte_ids = list(byte_ids)
        if sorted(byte_ids) != list(range(256)):
            raise ValueError("byte_ids must give each of the 256 byte values its own id in 0..255")
        self.merges = dict(merges)
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        self.byte_ids = byte_ids
        self.vocab = {token_id: bytes([byte]) for byte, token_id in enumerate(byte_ids)}
        # Merged ids above every byte's, and each merge of two tokens already made: then a
        # merged token's id is above both its parts', which the merge loop relies on.
        for (left, right), token_id in sorted(self.merges.items(), key=lambda item: item[1]):
            if not _is_int(token_id) or not 256 <= token_id < ID_LIMIT or left not in self.vocab \
                    or right not in self.vocab or token_id in self.vocab:
                raise ValueError(f"merge ({left}, {right}) -> {token_id} must join two earlier "
                                 f"tokens into a new id from 256 to {ID_LIMIT - 1}")
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
            check_special_token(text, token_id)
            if token_id in self.vocab:
                raise ValueError(f"special token {text!r} has id {token_id}, already taken")
            self.vocab[token_id] = text.encode("utf-8")
        self._id_of_token = {}  # bytes -> id; of two tokens with the same bytes the first, as tiktoken
        for token_id, token in self.vocab.items():
            self._id_of_token.setdefault(token, token_id)
        self._byte_to_id = bytes(byte_ids)  # a bytes.translate table: byte value -> its id

    @property
    def n_vocab(self):
        """The number of ids: the largest id + 1, as tiktoken counts."""
        return max(self.vocab) + 1

    @property
    def max_token_value(self):
        return max(self.vocab)

    @property
    def eot_token(self):
        """The id of <|endoftext|>; KeyError if this tokenizer has none (as tiktoken)."""
        try:
            return self.special_tokens[END_OF_TEXT]
        except KeyError:
            raise KeyError(f"this tokenizer has no {END_OF_TEXT} special token") from None

    @property
    def special_tokens_set(self):
        return set(self.special_tokens)

    def encode_piece(self, piece):
        """Token ids of one piece of text (a word as the split pattern cuts it)."""
        return tuple(apply_merges(list(piece.encode("utf-8").translate(self._byte_to_id)), self.merges))

    def clear_cache(self):
        """Forget the pieces encoded so far (the pieces that are tokens stay)."""
        self._cache = dict(self._seed_cache)

    def encode_ordinary(self, text):
        """Token ids of `text`, reading special tokens as plain text.

        Each piece's ids come from the cache, or are merged and cached. In a long text
        with many new pieces those are merged first, all together (merge_together).
        """
        if len(self._cache) > CACHE_LIMIT:
            self.clear_cache()
        pieces = self._split(text)
        try:
            if len(pieces) >= BATCH_MIN_PIECES:
                try:
                    return self._cached_ids(pieces)
                except KeyError:
                    self._cache_new_pieces(set(pieces).difference(self._cache))
            return self._ids(pieces)
        except UnicodeEncodeError:  # lone surrogates: replaced by U+FFFD, as tiktoken does
            return self.encode_ordinary(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    def _cached_ids(self, pieces):
        """The ids of pieces that are all cached (KeyError otherwise)."""
        cache = self._cache
        ids = []
        for piece in pieces:
            ids += cache[piece]
        return ids

    def _ids(self, pieces):
        cache = self._cache
        ids = []
        for piece in pieces:
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = cache[piece] = self.encode_piece(piece)
            ids += piece_ids
        return ids

    def _cache_new_pieces(self, pieces):
        """Merge new pieces all together and cache their ids, if BATCH_MIN_PIECES or more
        are short enough; else they are left to _ids, one at a time.

        Pieces of more than BATCH_PIECE_LIMIT bytes are left to apply_merges: in
        merge_together a piece of n ids takes about one round per merge, each a pass
        over its ids, n**2 in all, where the rank buckets take n log n. At most
        BATCH_MAX_PIECES go together, which bounds merge_together's arrays.
        """
        encoded = [(piece, piece_bytes) for piece in pieces
                   if len(piece_bytes := piece.encode("utf-8")) <= BATCH_PIECE_LIMIT]
        if len(encoded) < BATCH_MIN_PIECES:
            return
        for start in range(0, len(encoded), BATCH_MAX_PIECES):
            batch, batch_bytes = zip(*encoded[start:start + BATCH_MAX_PIECES])
            byte_ids = b"".join(batch_bytes).translate(self._byte_to_id)
            merged = merge_together(byte_ids, list(map(len, batch_bytes)), self.merges, self._pair_ranks)
            self._cache.update(zip(batch, merged))

    @functools.cached_property
    def _pair_ranks(self):
        return PairRanks(self.merges)

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

    def encode_ordinary_batch(self, texts, *, num_threads=8):
        """encode_ordinary of each text. num_threads is tiktoken's; pure Python runs one."""
        return [self.encode_ordinary(text) for text in _batch(texts)]

    def encode_batch(self, texts, *, num_threads=8, allowed_special=frozenset(), disallowed_special="all"):
        """encode of each text, with the same special-token rules. num_threads is tiktoken's;
        pure Python runs one (the GIL would serialise threads anyway)."""
        return [self.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)
                for text in _batch(texts)]

    def encode_single_token(self, text_or_bytes):
        """The id of the token whose text (str) or bytes this is, special tokens included.

        KeyError, as in tiktoken, if no single token has exactly these bytes.
        """
        if isinstance(text_or_bytes, str):
            token = text_or_bytes.encode("utf-8")
        elif isinstance(text_or_bytes, (bytes, bytearray)):
            token = bytes(text_or_bytes)
        else:
            raise TypeError(f"encode_single_token takes a str or bytes, not {type(text_or_bytes).__name__}")
        try:
            return self._id_of_token[token]
        except KeyError:
            raise KeyError(f"{text_or_bytes!r} is not a single token of this tokenizer") from None

    def decode_single_token_bytes(self, token_id):
        """The bytes of one token; KeyError, as in tiktoken, for an id outside the vocabulary."""
        try:
            return self.vocab[token_id]
        except (KeyError, TypeError):
            raise KeyError(f"token id {token_id!r} is not in the vocabulary (ids 0..{self.max_token_value})") from None

    def decode_tokens_bytes(self, ids):
        """The bytes of each token."""
        return [self.decode_single_token_bytes(token_id) for token_id in ids]

    def decode_bytes(self, ids):
        try:
            return b"".join(map(self.vocab.__getitem__, ids))
        except KeyError as error:
            raise ValueError(f"token id {error.args[0]!r} is not in the vocabulary "
                             f"(ids 0..{self.max_token_value})") from None

    def decode(self, ids, errors="replace"):
        """The text of token ids; by default bytes that are not valid UTF-8 become U+FFFD, as in
        tiktoken (`errors` is bytes.decode's: "strict" raises instead)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_batch(self, batch, *, errors="replace", num_threads=8):
        return [self.decode(ids, errors=errors) for ids in batch]

    def decode_with_offsets(self, ids):
        """(text, offsets): offsets[i] is the index in `text` of the character where token i starts.

        A token that starts inside a character (on a UTF-8 continuation byte, 0b10xxxxxx)
        is given the offset of that character, as tiktoken does. The bytes must be valid
        UTF-8 (UnicodeDecodeError otherwise), so that every offset is a character index.
        """
        tokens = self.decode_tokens_bytes(ids)
        offsets = []
        characters_before = 0  # characters started by the tokens so far
        for token in tokens:
            starts_inside_a_character = bool(token) and _is_continuation_byte(token[0])
            offsets.append(max(0, characters_before - starts_inside_a_character))
            characters_before += sum(not _is_continuation_byte(byte) for byte in token)
        return b"".join(tokens).decode("utf-8", errors="strict"), offsets


def _is_continuation_byte(byte):
    return 0x80 <= byte < 0xC0


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _batch(texts):
    if isinstance(texts, str):
        raise TypeError("a batch is a list of strings, not one string: encode() takes one text")
    return texts


def compile_split_pattern(pattern):
    try:
        return regex.compile(pattern)
    except (regex.error, TypeError) as error:
        raise ValueError(f"the split pattern {pattern!r} is not a valid regular expression: {error}") from None


def check_special_token(text, token_id):
    """A special token is a non-empty string with an integer id of 0 or more."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"special token {text!r} must be a non-empty string")
    if not _is_int(token_id) or token_id < 0:
        raise ValueError(f"special token {text!r} has id {token_id!r}: expected an integer of 0 or more")
