"""Chapter 7's data: the Alpaca prompt, the book's split, the dataset and the collate against the book's torch code."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference import instruct as torch_instruct
from tinygrad_llm.finetune.instruct import (InstructionDataset, custom_collate_fn, extract_response, format_input,
                                            generate_responses, load_instruction_data, load_responses,
                                            split_instruction_data, split_loss, write_responses)
from tinygrad_llm.tokenizers import get_gpt2_tokenizer

ENTRY = {"instruction": "Evaluate the following phrase by transforming it into the spelling given.",
         "input": "freind --> friend", "output": "The spelling of the given phrase \"freind\" is incorrect, "
                                                 "the correct spelling is \"friend\"."}


@pytest.fixture(scope="module")
def tokenizer():
    return get_gpt2_tokenizer()


def test_format_input_is_the_books_prompt():
    assert format_input(ENTRY) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nEvaluate the following phrase by transforming it into the spelling given."
        "\n\n### Input:\nfreind --> friend")
    # an empty input leaves the Input section out
    assert format_input({**ENTRY, "input": ""}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nEvaluate the following phrase by transforming it into the spelling given.")


def test_the_registry_file_splits_as_the_book_in_order():
    data = load_instruction_data()
    assert len(data) == 1100
    train, test, val = split_instruction_data(data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train[0] is data[0] and test[0] is data[935] and val[0] is data[1045] and val[-1] is data[-1]
    # the book's first entry
    assert data[0]["instruction"] == "Evaluate the following phrase by transforming it into the spelling given."


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("   \n", "is empty"),
    ("[]", "non-empty JSON list"),
    ("{\"instruction\": \"x\"}", "non-empty JSON list"),
    ("[{\"instruction\": \"a\", \"input\": \"\", \"output\": \"b\"}, {\"input\": \"\", \"output\": \"b\"}]",
     "entry 1 has no string 'instruction' \\(missing\\)"),
    ("[{\"instruction\": \"a\", \"input\": \"\"}]", "entry 0 has no string 'output'"),
    ("[{\"instruction\": \"a\", \"output\": 3}]", "entry 0 has no string 'output' \\(a int\\)"),
    ("[\"just text\"]", "entry 0 is a str"),
    ("[{\"instruction\": \"a\", \"output\": \"b\"", "not valid JSON"),
])
def test_bad_data_files_get_one_clear_message(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_instruction_data(path)


def test_an_entry_without_input_is_fine(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}]))
    assert format_input(load_instruction_data(path)[0]).endswith("### Instruction:\nSay hi.")


def test_dataset_items_are_the_prompt_and_response_ids(tokenizer):
    entries = [ENTRY, {**ENTRY, "input": ""}]
    dataset = InstructionDataset(entries, tokenizer)
    assert len(dataset) == 2
    for entry, ids in zip(entries, [dataset[0], dataset[1]]):
        assert isinstance(ids, list)
        assert tokenizer.decode(ids) == format_input(entry) + "\n\n### Response:\n" + entry["output"]
    masked = InstructionDataset(entries, tokenizer, mask_instruction=True)
    length, ids = masked[0]
    assert ids == dataset[0] and length == len(tokenizer.encode(format_input(ENTRY)))
    assert ids[:length] == tokenizer.encode(format_input(ENTRY))


def test_collate_gives_the_books_example():
    inputs, targets = custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(inputs, [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]])
    np.testing.assert_array_equal(targets, [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100],
                                            [8, 9, 50256, -100, -100]])
    assert inputs.dtype == targets.dtype == np.int64


def test_collate_masking_the_instruction_keeps_only_the_response_targets():
    inputs, targets = custom_collate_fn([(3, [10, 11, 12, 13, 14]), (1, [20, 21])], mask_instruction=True)
    np.testing.assert_array_equal(inputs, [[10, 11, 12, 13, 14], [20, 21, 50256, 50256, 50256]])
    # item 0: the prompt is 10 11 12; the targets 11 and 12 are prompt tokens, 13 is the first response token;
    # item 1: a one-token prompt has no target to hide
    np.testing.assert_array_equal(targets, [[-100, -100, 13, 14, 50256], [21, 50256, -100, -100, -100]])


def test_collate_refuses_plain_items_when_masking():
    with pytest.raises(ValueError, match="instruction_length, ids"):
        custom_collate_fn([[1, 2, 3]], mask_instruction=True)


PAD = 7  # a small pad id, so random items contain it too: the book's rule then treats it as a pad


@st.composite
def batches(draw):
    """A batch of random token lists (ids 0..9, the pad among them), instruction lengths, an allowed_max_length."""
    items = draw(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=12), min_size=1, max_size=5))
    lengths = [draw(st.integers(1, len(item))) for item in items]
    longest = max(len(item) for item in items)
    allowed = draw(st.one_of(st.none(), st.integers(1, longest), st.integers(longest + 1, longest + 5)))
    return items, lengths, allowed


@given(batch=batches(), mask_instruction=st.booleans())
def test_collate_matches_the_books_torch_collate(batch, mask_instruction):
    items, lengths, allowed = batch
    if mask_instruction:
        items = list(zip(lengths, items))
    options = dict(pad_token_id=PAD, allowed_max_length=allowed, mask_instruction=mask_instruction)
    inputs, targets = custom_collate_fn(items, **options)
    expected_inputs, expected_targets = torch_instruct.custom_collate_fn(items, **options)
    np.testing.assert_array_equal(inputs, expected_inputs.numpy())
    np.testing.assert_array_equal(targets, expected_targets.numpy())


# ---- responses and the test loss -----------------------------------------------------------------

SMALL = {"vocab_size": 50257, "context_length": 128, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
         "drop_rate": 0.0, "qkv_bias": True}


@pytest.fixture(scope="module")
def small_model():
    import tinygrad_llm as tl

    return tl.GPTModel(SMALL, dtype="float64", seed=3)


def test_extract_response_is_the_books():
    prompt = format_input(ENTRY)
    assert extract_response(prompt + "\n\n### Response:\nThe spelling is friend.", prompt) == "The spelling is friend."


def test_batched_responses_are_the_books_one_by_one(small_model, tokenizer, tmp_path):
    import tinygrad_llm as tl
    from tinygrad_llm.generate import text_to_token_ids, token_ids_to_text

    entries = load_instruction_data()[:5]
    responses = generate_responses(small_model, tokenizer, entries, max_new_tokens=12, batch_size=2, progress=False)
    for entry, response in zip(entries, responses):
        prompt = format_input(entry)
        token_ids = tl.generate(small_model, text_to_token_ids(prompt, tokenizer), 12, 128, eos_id=50256)
        assert response == extract_response(token_ids_to_text(token_ids, tokenizer), prompt)
    path = write_responses(tmp_path / "instruction-data-with-response.json", entries, responses)
    loaded = load_responses(path)
    assert [e["model_response"] for e in loaded] == responses and loaded[0]["output"] == entries[0]["output"]


def test_a_responses_file_without_responses_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([ENTRY]))
    with pytest.raises(ValueError, match="entry 0 has no string 'model_response'"):
        load_responses(path)
    path.write_text("")
    with pytest.raises(ValueError, match="responses file .* is empty"):
        load_responses(path)


@pytest.mark.parametrize("mask_instruction", [False, True])
def test_split_loss_is_the_torch_models_loss_on_the_books_batches(small_model, tokenizer, mask_instruction):
    import torch

    from reference import gpt as torch_gpt

    entries = load_instruction_data()[:5]
    result = split_loss(small_model, entries, tokenizer, batch_size=2, mask_instruction=mask_instruction)
    torch_model = torch_gpt.load_into_torch(torch_gpt.GPTModel(SMALL).double().eval(), small_model.state_dict())
    dataset = InstructionDataset(entries, tokenizer, mask_instruction=mask_instruction)
    losses = []
    for start in range(0, 5, 2):
        inputs, targets = torch_instruct.custom_collate_fn([dataset[i] for i in range(start, min(start + 2, 5))],
                                                           allowed_max_length=1024, mask_instruction=mask_instruction)
        with torch.no_grad():
            logits = torch_model(inputs)
        losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item())
    assert result["loss"] == pytest.approx(np.mean(losses), rel=1e-10)  # float64 both
    assert result["perplexity"] == pytest.approx(np.exp(np.mean(losses)), rel=1e-10)
