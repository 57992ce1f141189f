"""Chapter 7's fine-tune through the one loop against the book's loop in torch: same losses, same weights."""
import numpy as np
import pytest
import torch

import tinygrad_llm as tl
from reference import gpt as torch_gpt
from reference import instruct as torch_instruct
from reference import lora as torch_lora
from tinygrad_llm.finetune.instruct import finetune_instruct, instruction_loader, load_instruction_data
from tinygrad_llm.lora import replace_linear_with_lora
from tinygrad_llm.tokenizers import get_gpt2_tokenizer

# GPT-2's vocabulary (the real tokenizer and data), a model small enough for a test; the
# collate cuts the book's entries to the 48-token context.
CFG = {"vocab_size": 50257, "context_length": 48, "emb_dim": 16, "n_heads": 2, "n_layers": 2,
       "drop_rate": 0.0, "qkv_bias": True}
LR = 1e-3  # 20x the book's 5e-5, so that 12 steps of a tiny random model move its losses visibly
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@pytest.fixture(scope="module")
def splits():
    data = load_instruction_data()
    return data[:12], data[935:941]  # 6 + 6 batches of 2 over 2 epochs: 12 steps (6 with accumulation 2)


def run_both(splits, dtype, accumulation_steps=1, lora_rank=None, mask_instruction=False):
    tokenizer = get_gpt2_tokenizer()
    train_data, val_data = splits
    options = dict(batch_size=2, allowed_max_length=CFG["context_length"], mask_instruction=mask_instruction)
    train_loader = instruction_loader(train_data, tokenizer, **options)  # in order, so torch sees the same batches
    val_loader = instruction_loader(val_data, tokenizer, **options)
    model = tl.GPTModel(CFG, dtype=dtype, seed=1)
    start = tl.GPTModel(CFG, dtype=dtype, seed=1)
    tl.manual_seed(4)  # the adapters' A matrices: drawn alike for both copies
    if lora_rank is not None:
        for p in start.parameters():
            p.requires_grad = False
        replace_linear_with_lora(start, lora_rank, lora_rank)
    torch_model = torch_gpt.GPTModel(CFG).to(TORCH_DTYPES[dtype])
    if lora_rank is not None:
        for p in torch_model.parameters():
            p.requires_grad = False
        torch_lora.replace_linear_with_lora(torch_model, lora_rank, lora_rank)
        torch_model.to(TORCH_DTYPES[dtype])
    torch_gpt.load_into_torch(torch_model, start.state_dict())

    tl.manual_seed(4)
    ours = finetune_instruct(model, train_loader, val_loader, num_epochs=2, lr=LR, eval_freq=1, eval_iter=2,
                             lora_rank=lora_rank, accumulation_steps=accumulation_steps, progress=False)
    as_torch = [tuple(torch.from_numpy(np.asarray(a)) for a in batch) for batch in train_loader]
    val_torch = [tuple(torch.from_numpy(np.asarray(a)) for a in batch) for batch in val_loader]
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=LR, weight_decay=0.1)  # the book's decay
    theirs = torch_instruct.train_model_simple(torch_model, as_torch, val_torch, optimizer, num_epochs=2,
                                               eval_freq=1, eval_iter=2, accumulation_steps=accumulation_steps)
    return model, ours, torch_model, theirs


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-9), ("float32", 1e-4)])  # f32: rounding of ~12 steps
def test_twelve_steps_match_the_books_loop_in_torch(splits, dtype, rtol):
    model, ours, torch_model, theirs = run_both(splits, dtype)
    assert len(ours[0]) == 12
    np.testing.assert_allclose(ours[0], theirs[0], rtol=rtol)  # train losses at every step
    np.testing.assert_allclose(ours[1], theirs[1], rtol=rtol)  # validation losses
    assert ours[2] == theirs[2]  # tokens seen
    assert ours[0][-1] < ours[0][0]  # it learned
    expected = torch_gpt.from_torch_state_dict(torch_model.state_dict())
    for name, value in model.state_dict().items():
        if dtype == "float32" and name.endswith("W_key.bias"):
            # A key bias shifts all of a query's scores alike, which the softmax ignores: its true
            # gradient is zero, and float32 gives both libraries rounding noise that AdamW scales
            # up to steps of about lr. Each side drifts at most lr per step.
            np.testing.assert_allclose(value, expected[name], atol=2 * 12 * LR, err_msg=name)
            continue
        np.testing.assert_allclose(value, expected[name], rtol=rtol * 10, atol=rtol, err_msg=name)


def test_gradient_accumulation_and_instruction_masking_match_torch(splits):
    model, ours, torch_model, theirs = run_both(splits, "float64", accumulation_steps=2, mask_instruction=True)
    assert len(ours[0]) == 6
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-9)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-9)
    expected = torch_gpt.from_torch_state_dict(torch_model.state_dict())
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-8, atol=1e-10, err_msg=name)


def test_lora_trains_only_the_adapters_as_torch_does(splits):
    model, ours, torch_model, theirs = run_both(splits, "float64", lora_rank=2)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-9)
    expected = torch_gpt.from_torch_state_dict(torch_model.state_dict())
    start = tl.GPTModel(CFG, dtype="float64", seed=1).state_dict()
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-8, atol=1e-10, err_msg=name)
        if ".lora." not in name:
            np.testing.assert_array_equal(value, start[name.replace(".linear.", ".")], err_msg=name)  # frozen


def test_lora_rank_16_on_gpt2_medium_trains_the_books_count():
    model = tl.GPTModel(tl.gpt2_config("gpt2-medium", qkv_bias=True), init_weights=False)  # shapes only
    batch = (np.zeros((1, 4), np.int64), np.zeros((1, 4), np.int64))
    finetune_instruct(model, [batch], [batch], num_epochs=0, lora_rank=16, progress=False)
    assert model.num_parameters(trainable=True) == 7_898_384  # the book's exercise 7.4 (LoRA) figure
