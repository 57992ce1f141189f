"""The byte-level BPE trainer: the book's example, a naive reference, round trips, save/load."""
from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from tinygrad_llm import datasets
from tinygrad_llm.tokenizers import GPT2_SPLIT_PATTERN, BPETokenizer
from tinygrad_llm.tokenizers.bpe import merge_pair
from tinygrad_llm.tokenizers.byte_pair import BATCH_MIN_PIECES, merge_by_rank_buckets, merge_lowest_first

VERDICT = datasets.path("the-verdict").read_text(encoding="utf-8")
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
# Few distinct characters, so that pairs repeat and many merges happen.
REPETITIVE_TEXT = st.text(st.sampled_from("ab c\n'éß😀"), max_size=200)


def naive_train(text, n_merges):
    """The book's algorithm, counting every pair again before each merge."""
    words = [list(w.encode("utf-8")) for w in regex.findall(GPT2_SPLIT_PATTERN, text)]
    merges = {}
    for new_id in range(256, 256 + n_merges):
        counts = Counter(pair for ids in words for pair in zip(ids, ids[1:]))
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        merges[best] = new_id
        words = [merge_pair(ids, best, new_id) for ids in words]
    return merges


def naive_encode(text, merges):
    """Apply the merges to each piece in the order they were learned, without any cache."""
    ids = []
    for word in regex.findall(GPT2_SPLIT_PATTERN, text):
        word_ids = list(word.encode("utf-8"))
        for pair, new_id in sorted(merges.items(), key=lambda item: item[1]):
            word_ids = merge_pair(word_ids, pair, new_id)
        ids += word_ids
    return ids


@pytest.fixture(scope="module")
def verdict_tokenizer():
    # Training time is measured by benchmarks/tokenizer.py, never asserted here.
    return BPETokenizer.train(VERDICT, 1000, special_tokens=["<|endoftext|>"])


def test_the_classic_example():
    tokenizer = BPETokenizer.train("aaabdaaabac", vocab_size=259)
    # "aa" is the most frequent pair; then "aa"+"a" and "a"+"b" tie and the smaller ids win.
    assert tokenizer.merges == {(97, 97): 256, (97, 98): 257, (256, 257): 258}
    assert tokenizer.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert tokenizer.decode([258]) == "aaab"


def test_a_1000_token_vocabulary_on_the_verdict(verdict_tokenizer):
    assert verdict_tokenizer.n_vocab == 1000
    assert verdict_tokenizer.special_tokens == {"<|endoftext|>": 999}
    ids = verdict_tokenizer.encode(VERDICT)
    assert verdict_tokenizer.decode(ids) == VERDICT
    # 743 merges learned on this very text compress it (measured: 6,999 tokens for 20,479 bytes).
    assert len(ids) < len(VERDICT.encode()) / 2.5


@settings(max_examples=25)
@given(REPETITIVE_TEXT, st.integers(0, 40))
def test_incremental_pair_counts_learn_the_naive_trainers_merges(text, n_merges):
    assert BPETokenizer.train(text, 256 + n_merges).merges == naive_train(text, n_merges)


@given(REPETITIVE_TEXT | TEXT)
def test_encoding_matches_applying_the_merges_in_order(verdict_tokenizer, text):
    assert verdict_tokenizer.encode_ordinary(text) == naive_encode(text, verdict_tokenizer.merges)


def test_many_new_pieces_merged_together_match_the_merge_loop(verdict_tokenizer):
    # The Verdict with and without its spaces: thousands of new pieces, merged in NumPy.
    text = VERDICT + "".join(VERDICT.split())
    pieces = regex.findall(GPT2_SPLIT_PATTERN, text)
    assert len(set(pieces)) > BATCH_MIN_PIECES
    verdict_tokenizer.clear_cache()
    assert verdict_tokenizer.encode_ordinary(text) == \
        [i for piece in pieces for i in merge_lowest_first(list(piece.encode("utf-8")), verdict_tokenizer.merges)]


@given(TEXT)
def test_decode_inverts_encode_for_any_text(verdict_tokenizer, text):
    assert verdict_tokenizer.decode(verdict_tokenizer.encode(text)) == text


@settings(max_examples=25)
@given(REPETITIVE_TEXT | TEXT, TEXT)
def test_a_tokenizer_trained_on_any_text_round_trips_any_text(training_text, text):
    tokenizer = BPETokenizer.train(training_text, 300)
    assert tokenizer.decode(tokenizer.encode(text)) == text


@given(TEXT)
def test_save_and_load_give_the_same_ids(verdict_tokenizer, tmp_path_factory, text):
    path = tmp_path_factory.mktemp("bpe") / "verdict.bpe"
    verdict_tokenizer.save(path)
    loaded = BPETokenizer.load(path)
    text += "<|endoftext|>"
    assert loaded.encode(text, allowed_special="all") == verdict_tokenizer.encode(text, allowed_special="all")
    assert loaded.merges == verdict_tokenizer.merges
    assert loaded.pattern == verdict_tokenizer.pattern


def test_the_saved_file_is_readable_text(verdict_tokenizer, tmp_path):
    verdict_tokenizer.save(tmp_path / "verdict.bpe")
    lines = (tmp_path / "verdict.bpe").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "tinygrad_llm bpe v2"
    assert lines[2] == 'special_tokens {"<|endoftext|>": 999}'
    assert lines[3] == "merges 743"
    assert len(lines) == 4 + 743
    left, right = map(int, lines[4].split("\t")[0].split())
    assert lines[4].split("\t")[1] == f'"{verdict_tokenizer.decode([left, right])}"'


def test_special_tokens_are_encoded_only_when_allowed(verdict_tokenizer):
    assert verdict_tokenizer.encode("end<|endoftext|>", allowed_special={"<|endoftext|>"})[-1] == 999
    assert 999 not in verdict_tokenizer.encode("end<|endoftext|>", disallowed_special=())
    with pytest.raises(ValueError, match="<|endoftext|>"):
        verdict_tokenizer.encode("end<|endoftext|>")


def test_training_stops_when_no_pair_is_left():
    assert BPETokenizer.train("ab", 1000).merges == {(97, 98): 256}


def test_vocab_size_must_hold_the_bytes_and_special_tokens():
    with pytest.raises(ValueError, match="vocab_size=256 is too small.*257"):
        BPETokenizer.train("text", 256, special_tokens=["<|endoftext|>"])


def test_loading_another_file_names_it(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="vocab.json is not a saved BPETokenizer"):
        BPETokenizer.load(path)


@given(st.text(st.sampled_from("ab"), min_size=2, max_size=60), st.integers(1, 30),
       st.lists(st.sampled_from([97, 98]), max_size=150))
def test_the_rank_buckets_merge_as_the_plain_loop_on_learned_merges(training_text, n_merges, ids):
    # Two letters and merges learned on one unsplit piece: many overlapping and chained
    # pairs, which is where merging one rank at a time could go wrong.
    merges = BPETokenizer.train(training_text, 256 + n_merges, pattern=r"[\s\S]+").merges
    assert merge_by_rank_buckets(list(ids), merges) == merge_lowest_first(list(ids), merges)


def test_eot_token_is_the_end_of_text_special_token(verdict_tokenizer):
    assert verdict_tokenizer.eot_token == 999
    with pytest.raises(KeyError, match="no <|endoftext|> special token"):
        BPETokenizer.train("ab", 300).eot_token


# Damaged files: each names the file and the line, instead of loading something else.
@pytest.fixture
def saved_lines(verdict_tokenizer, tmp_path):
    verdict_tokenizer.save(tmp_path / "verdict.bpe")
    return (tmp_path / "verdict.bpe").read_text(encoding="utf-8").split("\n")


def write(tmp_path, lines):
    path = tmp_path / "edited.bpe"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda lines: lines[:100] + [lines[100][:3]], r"line 101: the file ends in the middle of this line"),
    (lambda lines: lines[:500] + [""], r"line 4: announces 743 merges but the file holds 496"),
    (lambda lines: lines[:2] + [""], r"line 3: the file ends before its header does"),
    (lambda lines: lines[:2] + ['special_tokens {"<|endoftext|>": "999"}'] + lines[3:],
     r"line 3: special token '<\|endoftext\|>' has id '999': expected an integer of 0 or more"),
    (lambda lines: lines[:2] + ['special_tokens {"<|endoftext|>": -1}'] + lines[3:],
     r"line 3: special token '<\|endoftext\|>' has id -1"),
    (lambda lines: lines[:2] + ['special_tokens {"<|endoftext|>": true}'] + lines[3:],
     r"line 3: special token '<\|endoftext\|>' has id True"),
    (lambda lines: lines[:2] + ['special_tokens {"<|endoftext|>": 5000}'] + lines[3:],
     r"line 3: the special tokens have ids \[5000\], but after the 256 bytes and 743 merges they take ids \[999\]"),
    (lambda lines: lines[:2] + ['special_tokens {"<|endoftext|>": 998}'] + lines[3:],
     r"line 3: the special tokens have ids \[998\]"),
    (lambda lines: lines[:2] + ['special_tokens {"": 999}'] + lines[3:],
     r"line 3: special token '' must be a non-empty string"),
    (lambda lines: lines[:2] + ['special_tokens {"<|a|>": 999, "<|a|>": 1000}'] + lines[3:], r"line 3: expected special_tokens"),
    (lambda lines: lines[:2] + ['special_tokens [999]'] + lines[3:], r"line 3: expected special_tokens"),
    (lambda lines: lines[:1] + ['pattern "(unclosed"'] + lines[2:], r"line 2: the split pattern '\(unclosed' is not a valid"),
    (lambda lines: lines[:1] + ["pattern 42"] + lines[2:], r"line 2: expected pattern"),
    (lambda lines: lines[:3] + ["merges many"] + lines[4:], r"line 4: expected \"merges <number of merge lines>\""),
    (lambda lines: lines[:10] + ["12 x\t\"?\""] + lines[11:], r"line 11: expected a merge \"left right\""),
    (lambda lines: lines[:10] + ["12 700\t\"?\""] + lines[11:], r"line 11: the merge 12 700 makes token 262, so it may only join tokens below 262"),
    (lambda lines: lines[:10] + [lines[5]] + lines[11:], r"line 11: the merge .* repeats line 6"),
])
def test_a_damaged_file_names_itself_and_the_line(saved_lines, tmp_path, edit, message):
    path = write(tmp_path, edit(saved_lines))
    with pytest.raises(ValueError, match=rf"edited\.bpe, {message}"):
        BPETokenizer.load(path)


def test_the_unedited_file_loads(saved_lines, tmp_path, verdict_tokenizer):
    assert BPETokenizer.load(write(tmp_path, saved_lines)).merges == verdict_tokenizer.merges


def test_a_file_without_the_merge_count_still_loads(saved_lines, tmp_path, verdict_tokenizer):
    # The first format had no "merges N" line; such files are read, the special ids still checked.
    v1 = ["tinygrad_llm bpe v1"] + saved_lines[1:3] + saved_lines[4:]
    assert BPETokenizer.load(write(tmp_path, v1)).merges == verdict_tokenizer.merges
    with pytest.raises(ValueError, match=r"line 3: the special tokens have ids \[999\].*take ids \[755\]"):
        BPETokenizer.load(write(tmp_path, v1[:-245] + [""]))


def test_a_binary_file_is_not_a_tokenizer(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="weights.bin is not a saved BPETokenizer: it is not UTF-8"):
        BPETokenizer.load(tmp_path / "weights.bin")


@pytest.mark.parametrize("kwargs, message", [
    ({"special_tokens": [""]}, "special token '' must be a non-empty string"),
    ({"special_tokens": ["<|a|>", "<|a|>"]}, "special token '<|a|>' is listed twice"),
    ({"special_tokens": [7]}, "special token 7 must be a non-empty string"),
    ({"special_tokens": "<|endoftext|>"}, "special_tokens must be a list of strings"),
    ({"vocab_size": 300.0}, "vocab_size must be an integer, got 300.0"),
    ({"pattern": "(unclosed"}, "the split pattern '(unclosed' is not a valid regular expression"),
])
def test_training_checks_its_arguments_first(kwargs, message):
    arguments = {"text": "some text", "vocab_size": 300} | kwargs
    with pytest.raises(ValueError, match=regex.escape(message)):
        BPETokenizer.train(**arguments)


@pytest.mark.parametrize("special_tokens, message", [
    ({"": 300}, "special token '' must be a non-empty string"),
    ({"<|x|>": "300"}, "special token '<|x|>' has id '300'"),
    ({"<|x|>": -3}, "special token '<|x|>' has id -3"),
])
def test_the_constructor_checks_special_tokens(special_tokens, message):
    with pytest.raises(ValueError, match=regex.escape(message)):
        BPETokenizer({}, special_tokens=special_tokens)


def test_a_merge_must_make_a_new_id_above_the_bytes():
    with pytest.raises(ValueError, match=r"merge \(97, 98\) -> -5 must join two earlier tokens into a new id from 256"):
        BPETokenizer({(97, 98): -5})
