"""The book's chapter 2 word tokenizers: a fixed vocabulary of words and punctuation marks."""
import re

UNKNOWN = "<|unk|>"
END_OF_TEXT = "<|endoftext|>"
# Cut at punctuation, "--" and whitespace, keeping the punctuation marks as tokens.
SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
# Decoding joins tokens with spaces; a punctuation mark takes back the space before it.
SPACE_BEFORE_PUNCTUATION = re.compile(r'\s+([,.?!"()\'])')


def split_words(text):
    return [item.strip() for item in SPLIT.split(text) if item.strip()]


def build_vocab(text, special_tokens=(END_OF_TEXT, UNKNOWN)):
    """{token: id} for the sorted distinct words of `text`, then the special tokens."""
    words = sorted(set(split_words(text)) - set(special_tokens))
    return {token: token_id for token_id, token in enumerate(words + list(special_tokens))}


class SimpleTokenizerV1:
    """Maps each word to its id; a word missing from the vocabulary is an error."""

    def __init__(self, vocab):
        self.str_to_int = dict(vocab)
        self.int_to_str = {token_id: token for token, token_id in self.str_to_int.items()}

    def encode(self, text):
        ids = []
        for word in split_words(text):
            if word not in self.str_to_int:
                raise ValueError(f"{word!r} is not in the vocabulary; SimpleTokenizerV2 maps "
                                 f"unknown words to {UNKNOWN}")
            ids.append(self.str_to_int[word])
        return ids

    def decode(self, ids):
        unknown = [i for i in ids if i not in self.int_to_str]
        if unknown:
            raise ValueError(f"token id {unknown[0]!r} is not in the vocabulary of {len(self.int_to_str)} tokens")
        text = " ".join(self.int_to_str[i] for i in ids)
        return SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)


class SimpleTokenizerV2(SimpleTokenizerV1):
    """Like V1, but a word missing from the vocabulary becomes <|unk|>."""

    def __init__(self, vocab):
        super().__init__(vocab)
        if UNKNOWN not in self.str_to_int:
            raise ValueError(f"SimpleTokenizerV2 needs {UNKNOWN} in its vocabulary; build_vocab adds it")

    def encode(self, text):
        unknown_id = self.str_to_int[UNKNOWN]
        return [self.str_to_int.get(word, unknown_id) for word in split_words(text)]
