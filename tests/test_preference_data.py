"""Chapter 8's data: the preference entries, PreferenceDataset and the collate, against the book's torch collate."""
import json

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from reference import preference as ref_pref
from tinygrad_llm.finetune import preference
from tinygrad_llm.finetune.instruct import format_input, split_instruction_data
from tinygrad_llm.tokenizers import get_gpt2_tokenizer


def ids(max_size=12):
    return st.lists(st.integers(0, 50255), min_size=1, max_size=max_size)


@st.composite
def batches(draw):
    items = []
    for _ in range(draw(st.integers(1, 4))):
        prompt = draw(ids(6))
        items.append({"prompt": prompt, "chosen": prompt + draw(ids()), "rejected": prompt + draw(ids())})
    return items


@settings(max_examples=40, deadline=None)
@given(batch=batches(), mask_prompt_tokens=st.booleans(), allowed_max_length=st.none() | st.integers(1, 20))
def test_collate_matches_the_book(batch, mask_prompt_tokens, allowed_max_length):
    ours = preference.custom_collate_fn(batch, allowed_max_length=allowed_max_length,
                                        mask_prompt_tokens=mask_prompt_tokens)
    theirs = ref_pref.custom_collate_fn(batch, allowed_max_length=allowed_max_length,
                                        mask_prompt_tokens=mask_prompt_tokens)
    for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
        assert ours[key].dtype == (bool if key.endswith("mask") else np.int64)
        np.testing.assert_array_equal(ours[key], theirs[key].numpy(), err_msg=key)
    for mine, expected in zip(ours["prompt"], theirs["prompt"]):
        np.testing.assert_array_equal(mine, expected.numpy())


@pytest.fixture(scope="module")
def data():
    return preference.load_preference_data(allow_identical=True)


def test_the_book_data_and_split(data):
    train, test, val = split_instruction_data(data)
    assert (len(data), len(train), len(test), len(val)) == (1100, 935, 110, 55)


def test_dataset_masks_select_the_response(data):
    tokenizer = get_gpt2_tokenizer()
    dataset = preference.PreferenceDataset(data[:2], tokenizer)
    batch = preference.custom_collate_fn([dataset[0], dataset[1]])
    # The book's printout: both padded to 81 tokens; the mask picks "### Response:\n" and the answer.
    assert batch["chosen"].shape == batch["rejected"].shape == (2, 81)
    chosen = tokenizer.decode(batch["chosen"][0][batch["chosen_mask"][0]].tolist())
    assert chosen == "### Response:\n" + data[0]["chosen"]
    rejected = tokenizer.decode(batch["rejected"][1][batch["rejected_mask"][1]].tolist())
    assert rejected == "### Response:\n" + data[1]["rejected"]
    assert dataset[0]["prompt"] == tokenizer.encode(format_input(data[0]))


@pytest.mark.parametrize("missing", ["chosen", "rejected"])
def test_an_entry_without_an_answer_is_refused(missing):
    entry = {"instruction": "Say hi.", "input": "", "chosen": "Hi!", "rejected": "Go away."}
    del entry[missing]
    with pytest.raises(ValueError, match=f"entry 1 has no string '{missing}'"):
        preference.check_preference_data([{"instruction": "a", "chosen": "b", "rejected": "c"}, entry])


def test_identical_answers_are_refused(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "chosen": "Hi!", "rejected": "Hi!"}]))
    with pytest.raises(ValueError, match="entry 0 has the same text as chosen and rejected"):
        preference.load_preference_data(path)


def test_the_book_file_holds_six_identical_pairs():
    with pytest.raises(ValueError, match="entry 122 has the same text"):
        preference.load_preference_data()
    data = preference.load_preference_data(allow_identical=True)
    assert [i for i, e in enumerate(data) if e["chosen"] == e["rejected"]] == [122, 226, 400, 566, 628, 676]
