"""The from-scratch GPT-2 tokenizer gives exactly tiktoken's ids, on files and generated text,
and has tiktoken's Encoding API."""
import random
import string

import numpy as np
import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from tinygrad_llm import datasets
from tinygrad_llm.tokenizers import GPT2_SPLIT_PATTERN, get_gpt2_tokenizer
from tinygrad_llm.tokenizers import byte_pair
from tinygrad_llm.tokenizers.byte_pair import (BATCH_MIN_PIECES, BATCH_PIECE_LIMIT, HANDOFF_PIECES, SHORT_PIECE,
                                              PairRanks, merge_by_rank_buckets, merge_lowest_first, merge_together)
from tinygrad_llm.tokenizers.gpt2 import TIKTOKEN_GPT2_PATTERN, GPT2Tokenizer, tiktoken_gpt2

tiktoken = pytest.importorskip("tiktoken")

OURS = get_gpt2_tokenizer()
TIKTOKEN = get_gpt2_tokenizer(backend="tiktoken")
# The pattern in OpenAI's GPT-2 encoder.py.
ORIGINAL_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

BOOK_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
BOOK_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286,
            617, 34680, 27271, 13]

# Unassigned code points are left out: the regex module and tiktoken's Rust regex may
# follow different Unicode versions, and a letter that only one of them knows would split
# differently. Every assigned code point was checked to agree (in words, spaces, numbers).
ANY_CHARACTER = st.characters(exclude_categories=("Cs", "Cn"))
FRAGMENTS = st.one_of(
    st.text(ANY_CHARACTER, max_size=20),
    st.text(st.sampled_from(" \t\n\r\x0b\x0c\x85\xa0\u2003\u3000"), min_size=1, max_size=6),
    st.sampled_from([
        "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "don't", "we'll", " 42", "3.14159", "1,000,000",
        "😀", "👍🏽", "👨‍👩‍👧", "漢字かなカナ", "한국어", "e\u0301", "a\u0308\u0323", "Ωμέγα", "ﬁ",
        "<|endoftext|>", " <|endoftext|>", "def f(x):\n    return x ** 2\n", "if (a != b) { x++; }",
        "    ", "\n\n", " Hello", "naïve café", "x", "\u200b", "\x00",
    ]),
)
TEXT = st.lists(FRAGMENTS, max_size=8).map("".join)


def test_the_books_example():
    assert OURS.encode(BOOK_TEXT, allowed_special={"<|endoftext|>"}) == BOOK_IDS
    assert OURS.decode(BOOK_IDS) == BOOK_TEXT


@given(TEXT)
def test_same_ids_as_tiktoken_and_decode_inverts_encode(text):
    ids = OURS.encode(text, allowed_special="all")
    assert ids == TIKTOKEN.encode(text, allowed_special="all")
    assert OURS.decode(ids) == text
    assert OURS.encode(text, disallowed_special=()) == TIKTOKEN.encode(text, disallowed_special=())


@given(TEXT)
def test_an_unallowed_special_token_raises_as_in_tiktoken(text):
    text += "<|endoftext|>"
    for tokenizer in (OURS, TIKTOKEN):
        with pytest.raises(ValueError, match="<|endoftext|>"):
            tokenizer.encode(text)


@given(st.lists(st.integers(0, 50256)))
def test_decode_matches_tiktoken_even_inside_a_character(ids):
    assert OURS.decode(ids) == TIKTOKEN.decode(ids)


@pytest.mark.parametrize("name", ["the-verdict", "sms-spam-collection", "instruction-data",
                                  "instruction-data-with-preference"])
def test_same_ids_as_tiktoken_on_the_data_files(name):
    text = datasets.path(name).read_text(encoding="utf-8")
    assert OURS.encode(text) == TIKTOKEN.encode(text)


def test_every_token_has_tiktokens_bytes_and_encodes_to_itself():
    assert OURS.n_vocab == TIKTOKEN.n_vocab == 50257
    for token_id in range(OURS.n_vocab):
        token = OURS.decode_bytes([token_id])
        assert token == TIKTOKEN.decode_single_token_bytes(token_id)
        # The piece cache starts with every token that is text: this is why it may.
        if token_id != OURS.eot_token and (text := token.decode("utf-8", errors="ignore")).encode() == token:
            assert OURS.encode_piece(text) == (token_id,)


def test_the_tiktoken_file_gives_the_same_merges_as_encoder_json_and_vocab_bpe():
    from_tiktoken = GPT2Tokenizer.from_tiktoken_file(datasets.path("gpt2-tiktoken"))
    assert from_tiktoken.merges == OURS.merges
    assert from_tiktoken.byte_ids == OURS.byte_ids


@given(TEXT)
def test_the_split_pattern_cuts_text_as_gpt2s_original_and_tiktokens(text):
    pieces = regex.findall(ORIGINAL_GPT2_PATTERN, text)
    assert regex.findall(GPT2_SPLIT_PATTERN, text) == pieces
    assert regex.findall(TIKTOKEN_GPT2_PATTERN, text) == pieces


def test_special_token_rules_follow_tiktoken():
    for kwargs in [{}, {"allowed_special": {"<|endoftext|>", "<|not-a-token|>"}}, {"allowed_special": "all"},
                   {"disallowed_special": ()}, {"disallowed_special": {"tea"}}]:
        for text in ["tea <|endoftext|>", "tea", "<|endoftext|><|endoftext|>"]:
            expected = _outcome(TIKTOKEN, text, kwargs)
            assert _outcome(OURS, text, kwargs) == expected, (text, kwargs)


def _outcome(tokenizer, text, kwargs):
    try:
        return tokenizer.encode(text, **kwargs)
    except ValueError:
        return ValueError


def test_lone_surrogates_become_replacement_characters_as_in_tiktoken():
    assert OURS.encode("a\ud800b") == TIKTOKEN.encode("a\ud800b") == OURS.encode("a\ufffdb")
    rng = random.Random(0)
    many_new_pieces = " ".join("".join(rng.choices("abcdefgh", k=12)) for _ in range(2 * BATCH_MIN_PIECES)) + " a\udfffb"
    OURS.clear_cache()
    assert OURS.encode(many_new_pieces) == TIKTOKEN.encode(many_new_pieces)


def test_decoding_an_unknown_id_names_it():
    with pytest.raises(ValueError, match="token id 50257 is not in the vocabulary"):
        OURS.decode([15496, 50257])


def test_token_ids_from_numpy_decode():
    np = pytest.importorskip("numpy")
    assert OURS.decode(np.array(BOOK_IDS)) == BOOK_TEXT


def test_the_tiktoken_backend_is_built_from_the_local_file_and_shared():
    assert isinstance(TIKTOKEN, tiktoken.Encoding)
    assert get_gpt2_tokenizer("tiktoken") is TIKTOKEN
    assert TIKTOKEN.encode(BOOK_TEXT, allowed_special={"<|endoftext|>"}) == BOOK_IDS


def test_without_a_local_file_the_tiktoken_backend_asks_tiktoken(tmp_path, monkeypatch):
    monkeypatch.delenv("TINYGRAD_LLM_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: f"tiktoken's {name}")
    assert tiktoken_gpt2() == "tiktoken's gpt2"


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'hf'"):
        get_gpt2_tokenizer(backend="hf")


def test_allowed_special_given_as_one_string_is_an_error():
    with pytest.raises(ValueError, match="allowed_special must be 'all' or a set of strings"):
        OURS.encode("<|endoftext|>", allowed_special="<|endoftext|>")


# Long pieces: one regex piece of thousands of bytes takes the rank-bucket merge loop.
@pytest.mark.parametrize("character", ["a", " ", "\n", "0", "!", "é", "😀", "漢"])
@pytest.mark.parametrize("length", [SHORT_PIECE, SHORT_PIECE + 1, 1000, 10_001])
def test_long_runs_of_one_character_give_tiktokens_ids(character, length):
    text = character * length
    assert OURS.encode(text) == TIKTOKEN.encode(text)


def test_a_hundred_thousand_repeated_letters_give_tiktokens_ids():
    # The case that took 77 s with the plain merge loop (about 0.1 s now).
    assert OURS.encode("a" * 100_000) == TIKTOKEN.encode("a" * 100_000)


def test_a_hundred_kilobytes_of_random_letters_give_tiktokens_ids():
    text = "".join(random.Random(0).choices(string.ascii_letters, k=100_000))  # one piece
    assert OURS.encode(text) == TIKTOKEN.encode(text)


NO_SPACE_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cn", "Zs", "Zl", "Zp", "Cc")),
                        min_size=SHORT_PIECE, max_size=3000)
FEW_LETTERS = st.text(st.sampled_from("aabe'é0"), min_size=SHORT_PIECE, max_size=3000)


@given(NO_SPACE_TEXT | FEW_LETTERS)
def test_long_text_without_spaces_gives_tiktokens_ids(text):
    OURS.clear_cache()
    assert OURS.encode_ordinary(text) == TIKTOKEN.encode_ordinary(text)


@given(st.text(st.sampled_from("aab é"), max_size=300) | TEXT)
def test_both_merge_loops_give_the_same_ids_at_any_length(text):
    ids = list(text.encode("utf-8").translate(OURS._byte_to_id))
    assert merge_by_rank_buckets(list(ids), OURS.merges) == merge_lowest_first(list(ids), OURS.merges)


def test_long_pieces_take_the_rank_buckets(monkeypatch):
    def plain_loop_for_short_pieces_only(ids, merges):
        assert len(ids) <= SHORT_PIECE, "a long piece went to the O(n**2) loop"
        return merge_lowest_first(ids, merges)

    monkeypatch.setattr(byte_pair, "merge_lowest_first", plain_loop_for_short_pieces_only)
    for length in [1, SHORT_PIECE, SHORT_PIECE + 1, 5000]:
        assert byte_pair.apply_merges([OURS.encode_single_token("a")] * length, OURS.merges) == \
            TIKTOKEN.encode("a" * length)


# Many new pieces at once: merged together in NumPy (merge_together).
LETTER = st.characters(categories=("L",))  # a run of letters is one piece, in any script
ONE_PIECE = st.one_of(
    st.text(LETTER, min_size=1, max_size=40),  # mixed scripts
    st.text(st.sampled_from("aabeé"), min_size=1, max_size=BATCH_PIECE_LIMIT),  # long chains of merges
    st.builds(lambda character, n: character * n, st.sampled_from("aé漢!0 ."), st.integers(1, BATCH_PIECE_LIMIT)),
    st.text(string.ascii_lowercase, min_size=SHORT_PIECE - 4, max_size=BATCH_PIECE_LIMIT // 2),  # glued words
).filter(lambda piece: len(OURS._split(piece)) == 1)


def _merge_together(pieces, handoff):
    encoded = [piece.encode("utf-8") for piece in pieces]
    byte_ids = b"".join(encoded).translate(OURS._byte_to_id)
    return merge_together(byte_ids, [len(piece) for piece in encoded], OURS.merges, OURS._pair_ranks, handoff)


@given(st.lists(ONE_PIECE, max_size=3 * HANDOFF_PIECES), st.sampled_from([0, 1, HANDOFF_PIECES]))
def test_pieces_merged_together_give_tiktokens_ids(pieces, handoff):
    # handoff=0: every piece merges in NumPy to the end; otherwise the last ones finish in Python.
    assert _merge_together(pieces, handoff) == [tuple(TIKTOKEN.encode_ordinary(piece)) for piece in pieces]


def test_runs_of_one_character_merged_together_give_tiktokens_ids():
    # Overlapping pairs of one rank ("aaaa"), at every length up to BATCH_PIECE_LIMIT bytes.
    pieces = [character * n for character in "a!0é漢"
              for n in range(1, BATCH_PIECE_LIMIT // len(character.encode()) + 1)]
    assert _merge_together(pieces, handoff=0) == [tuple(TIKTOKEN.encode_ordinary(piece)) for piece in pieces]


@pytest.fixture
def merge_together_calls(monkeypatch):
    """The number of pieces of each call to merge_together from here on."""
    calls = []

    def recording_merge_together(byte_ids, lengths, *args):
        calls.append(len(lengths))
        return merge_together(byte_ids, lengths, *args)

    monkeypatch.setattr(byte_pair, "merge_together", recording_merge_together)
    return calls


def test_many_new_pieces_are_merged_together(merge_together_calls):
    rng = random.Random(0)
    words = ["".join(rng.choices("aabcdeé漢", k=rng.randint(2, 30))) for _ in range(3 * BATCH_MIN_PIECES)]
    text = " ".join(words + ["x" * (BATCH_PIECE_LIMIT + 1), "é" * BATCH_PIECE_LIMIT])  # over the limit: alone
    OURS.clear_cache()
    assert OURS.encode(text) == TIKTOKEN.encode(text)
    assert len(merge_together_calls) == 1 and merge_together_calls[0] >= BATCH_MIN_PIECES
    OURS.clear_cache()
    few_words = " ".join(words[:BATCH_MIN_PIECES // 2])
    assert OURS.encode(few_words) == TIKTOKEN.encode(few_words)
    assert len(merge_together_calls) == 1, "a few new pieces take the Python loops"


def test_very_many_new_pieces_are_merged_in_batches(merge_together_calls, monkeypatch):
    monkeypatch.setattr(byte_pair, "BATCH_MAX_PIECES", 300)
    text = "".join(datasets.path("the-verdict").read_text(encoding="utf-8").split())
    OURS.clear_cache()
    assert OURS.encode_ordinary(text) == TIKTOKEN.encode_ordinary(text)
    assert len(merge_together_calls) > 1 and max(merge_together_calls) == 300


@pytest.mark.parametrize("name", ["the-verdict", "sms-spam-collection"])
def test_data_files_without_whitespace_give_tiktokens_ids(name):
    # Words glued together: thousands of new pieces of 10-160 bytes, merged together.
    text = "".join(datasets.path(name).read_text(encoding="utf-8").split())
    OURS.clear_cache()
    assert OURS.encode_ordinary(text) == TIKTOKEN.encode_ordinary(text)


ID = st.integers(0, 300) | st.integers(0, byte_pair.ID_LIMIT - 1)


@given(st.dictionaries(st.tuples(ID, ID), st.integers(256, byte_pair.ID_LIMIT - 1), max_size=40),
       st.lists(st.tuples(ID, ID), max_size=40))
def test_the_pair_table_gives_each_pairs_rank_as_the_merges_dict(merges, other_pairs):
    # Few merges make a small table, where keys collide and probing wraps around.
    table = PairRanks(merges)
    pairs = list(merges) + other_pairs
    left, right = (np.array([pair[side] for pair in pairs], dtype=np.int32) for side in (0, 1))
    expected = [merges.get(pair, byte_pair.NO_MERGE_32) for pair in pairs]
    assert table(left, right).tolist() == expected
    of_bytes = [i for i, (a, b) in enumerate(pairs) if a < 256 and b < 256]
    assert table.byte_pairs[left[of_bytes] * 256 + right[of_bytes]].tolist() == [expected[i] for i in of_bytes]


def test_the_pair_table_holds_every_gpt2_merge():
    left, right = (np.array([pair[side] for pair in OURS.merges], dtype=np.int32) for side in (0, 1))
    assert OURS._pair_ranks(left, right).tolist() == list(OURS.merges.values())


# tiktoken's Encoding API beyond encode/decode.
def test_vocabulary_sizes_and_end_of_text_as_tiktoken():
    assert (OURS.n_vocab, OURS.max_token_value, OURS.eot_token) == \
        (TIKTOKEN.n_vocab, TIKTOKEN.max_token_value, TIKTOKEN.eot_token) == (50257, 50256, 50256)
    assert OURS.special_tokens_set == TIKTOKEN.special_tokens_set == {"<|endoftext|>"}


@given(TEXT)
def test_encode_ordinary_reads_special_tokens_as_text_as_tiktoken(text):
    text += "<|endoftext|>"
    assert OURS.encode_ordinary(text) == TIKTOKEN.encode_ordinary(text)


@given(st.lists(TEXT, max_size=4))
def test_batches_as_tiktoken(texts):
    assert OURS.encode_ordinary_batch(texts) == TIKTOKEN.encode_ordinary_batch(texts)
    texts = [text + "<|endoftext|>" for text in texts]
    for kwargs in [{"allowed_special": "all"}, {"disallowed_special": ()}, {"num_threads": 2, "allowed_special": "all"}]:
        ids = OURS.encode_batch(texts, **kwargs)
        assert ids == TIKTOKEN.encode_batch(texts, **kwargs)
        assert OURS.decode_batch(ids) == TIKTOKEN.decode_batch(ids)
    if texts:
        for tokenizer in (OURS, TIKTOKEN):
            with pytest.raises(ValueError, match="<|endoftext|>"):
                tokenizer.encode_batch(texts)


def test_a_batch_given_as_one_string_is_an_error():
    # tiktoken would encode each character as a text of its own.
    with pytest.raises(TypeError, match="a batch is a list of strings"):
        OURS.encode_batch("Hello world")


def test_single_tokens_both_ways_as_tiktoken():
    for token_id in range(TIKTOKEN.n_vocab):
        token = TIKTOKEN.decode_single_token_bytes(token_id)
        assert OURS.decode_single_token_bytes(token_id) == token
        assert OURS.encode_single_token(token) == TIKTOKEN.encode_single_token(token) == token_id
    assert OURS.encode_single_token("hello") == TIKTOKEN.encode_single_token("hello") == 31373
    assert OURS.encode_single_token("<|endoftext|>") == TIKTOKEN.encode_single_token("<|endoftext|>") == 50256
    assert OURS.decode_tokens_bytes(BOOK_IDS) == TIKTOKEN.decode_tokens_bytes(BOOK_IDS)


@pytest.mark.parametrize("not_a_token", ["hello world", b"\xff\xfe", ""])
def test_encode_single_token_of_no_single_token_raises_key_error_as_tiktoken(not_a_token):
    for tokenizer in (OURS, TIKTOKEN):
        with pytest.raises(KeyError):
            tokenizer.encode_single_token(not_a_token)


def test_decode_single_token_bytes_of_an_unknown_id_raises_key_error_as_tiktoken():
    for tokenizer in (OURS, TIKTOKEN):
        with pytest.raises(KeyError):
            tokenizer.decode_single_token_bytes(50257)
    with pytest.raises(KeyError, match="token id 50257 is not in the vocabulary"):
        OURS.decode_single_token_bytes(50257)


@given(TEXT)
def test_decode_with_offsets_as_tiktoken(text):
    ids = OURS.encode(text, allowed_special="all")
    assert OURS.decode_with_offsets(ids) == TIKTOKEN.decode_with_offsets(ids)


@given(st.lists(st.integers(0, 50256), max_size=10))
def test_decode_with_offsets_inside_characters_as_tiktoken(ids):
    try:
        expected = TIKTOKEN.decode_with_offsets(ids)
    except UnicodeDecodeError:
        expected = UnicodeDecodeError
    try:
        assert OURS.decode_with_offsets(ids) == expected
    except UnicodeDecodeError:
        assert expected is UnicodeDecodeError


def test_a_token_starting_inside_a_character_has_that_characters_offset():
    ids = OURS.encode("a😀b")
    assert OURS.decode_tokens_bytes(ids) == [b"a", b"\xf0\x9f\x98", b"\x80", b"b"]  # 😀 in two tokens
    assert OURS.decode_with_offsets(ids) == ("a😀b", [0, 1, 1, 2])


@given(st.lists(st.integers(0, 50256), max_size=10))
def test_strict_decoding_as_tiktoken(ids):
    outcomes = []
    for tokenizer in (OURS, TIKTOKEN):
        try:
            outcomes.append(tokenizer.decode(ids, errors="strict"))
        except UnicodeDecodeError:
            outcomes.append(UnicodeDecodeError)
    assert outcomes[0] == outcomes[1]
