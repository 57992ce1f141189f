"""Tokenizers: the book's word tokenizers, a byte-level BPE trainer and GPT-2's BPE."""
from .bpe import BPETokenizer
from .byte_pair import GPT2_SPLIT_PATTERN, BytePairTokenizer
from .gpt2 import GPT2Tokenizer, get_gpt2_tokenizer
from .simple import SimpleTokenizerV1, SimpleTokenizerV2, build_vocab

__all__ = ["SimpleTokenizerV1", "SimpleTokenizerV2", "build_vocab", "BytePairTokenizer",
           "BPETokenizer", "GPT2Tokenizer", "get_gpt2_tokenizer", "GPT2_SPLIT_PATTERN"]
