"""The book's chapter 2 word tokenizers, with the book's numbers on "The Verdict"."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinygrad_llm import datasets
from tinygrad_llm.tokenizers import SimpleTokenizerV1, SimpleTokenizerV2, build_vocab
from tinygrad_llm.tokenizers.simple import split_words

VERDICT = datasets.path("the-verdict").read_text(encoding="utf-8")
VOCAB = build_vocab(VERDICT)
WORDS_ONLY = {word: i for word, i in VOCAB.items() if i < 1130}


def test_the_verdict_gives_the_books_token_and_vocabulary_sizes():
    assert len(split_words(VERDICT)) == 4690
    assert len(VOCAB) == 1132
    assert (VOCAB["<|endoftext|>"], VOCAB["<|unk|>"]) == (1130, 1131)
    assert sorted(VOCAB.values()) == list(range(1132))


def test_v1_encodes_and_decodes_the_books_example():
    tokenizer = SimpleTokenizerV1(WORDS_ONLY)
    text = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    ids = tokenizer.encode(text)
    assert ids == [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108, 754, 793, 7]
    # Decoding can't know that the quote and the apostrophe were attached to words.
    assert tokenizer.decode(ids) == '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'


def test_v1_names_the_unknown_word():
    with pytest.raises(ValueError, match="'Hello' is not in the vocabulary"):
        SimpleTokenizerV1(WORDS_ONLY).encode("Hello, do you like tea?")


def test_v2_maps_unknown_words_to_unk_as_in_the_book():
    tokenizer = SimpleTokenizerV2(VOCAB)
    text = " <|endoftext|> ".join(("Hello, do you like tea?", "In the sunlit terraces of the palace."))
    ids = tokenizer.encode(text)
    assert ids == [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]
    assert tokenizer.decode(ids) == "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."


def test_v2_needs_unk_in_its_vocabulary():
    with pytest.raises(ValueError, match="<|unk|>"):
        SimpleTokenizerV2(WORDS_ONLY)


def test_decoding_an_unknown_id_names_it():
    with pytest.raises(ValueError, match="token id 5000 is not in the vocabulary of 1132 tokens"):
        SimpleTokenizerV2(VOCAB).decode([5, 5000])


def test_special_tokens_in_the_text_are_not_counted_twice():
    vocab = build_vocab("a b <|unk|> c")
    assert vocab == {"a": 0, "b": 1, "c": 2, "<|endoftext|>": 3, "<|unk|>": 4}


@given(st.lists(st.sampled_from(sorted(VOCAB.values()))))
def test_decoded_text_encodes_back_to_the_same_ids(ids):
    # Decoding only removes the space before a punctuation mark, which is its own token.
    for tokenizer in (SimpleTokenizerV1(VOCAB), SimpleTokenizerV2(VOCAB)):
        assert tokenizer.encode(tokenizer.decode(ids)) == ids
