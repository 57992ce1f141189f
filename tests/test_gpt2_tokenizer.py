"""The from-scratch GPT-2 tokenizer gives exactly tiktoken's ids, on files and generated text."""
import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from tinygrad_llm import datasets
from tinygrad_llm.tokenizers import GPT2_SPLIT_PATTERN, get_gpt2_tokenizer
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
