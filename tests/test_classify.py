"""Chapter 6: the book's data split row for row, SpamDataset, the classifier functions, bad input,
and train_classifier_simple step for step against the book's torch loop (reference/classify.py)."""
import csv
import hashlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tinygrad_llm as tl
from reference import classify as torch_classify
from reference import gpt as torch_gpt
from tests.classifier_twin import LR, assert_same_classifier_runs
from tinygrad_llm.data import DataLoader
from tinygrad_llm.finetune.classify import (SpamDataset, calc_accuracy_loader, calc_loss_batch, calc_loss_loader,
                                            classify_review, create_balanced_dataset, evaluate_model, load_sms_spam,
                                            prepare_classifier, random_split)
from tinygrad_llm.tokenizers import get_gpt2_tokenizer

# sha256 of json.dumps([train, val, test]) with rows as [label, text]: the split the book's own
# pandas code (read_csv, sample(747, random_state=123), sample(frac=1, random_state=123)) gives.
BOOK_SPLIT_SHA256 = "9b3cd8699c40304f82ad96289bc26bc959e93cfc82d6698867ef303d25c16801"


@pytest.fixture(scope="module")
def book_split():
    return random_split(create_balanced_dataset(load_sms_spam()), 0.7, 0.1)


def test_the_sms_collection_reads_as_pandas_reads_it():
    rows = load_sms_spam()
    labels = [label for label, _ in rows]
    assert len(rows) == 5572 and labels.count("ham") == 4825 and labels.count("spam") == 747
    # a text that opens with a quote is a quoted field, as pandas parses it: the quotes go, the rest stays
    assert ("ham", "Wen u miss someone, the person is definitely special for u..... But if the person is so special, "
            "why to miss them, just Keep-in-touch gdeve..") in rows


def test_the_books_split_has_the_books_rows(book_split):
    train, val, test = book_split
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    counts = [(sum(label == "ham" for label, _ in part), sum(label == "spam" for label, _ in part)) for part in book_split]
    assert counts == [(528, 517), (70, 79), (149, 151)]
    assert hashlib.sha256(json.dumps([train, val, test]).encode()).hexdigest() == BOOK_SPLIT_SHA256


def test_spam_dataset_pads_to_the_longest_training_text_and_reads_the_books_csv(book_split, tmp_path):
    tokenizer = get_gpt2_tokenizer()
    train = SpamDataset(book_split[0], tokenizer)
    assert train.max_length == 120 and len(train) == 1045
    ids, label = train[0]
    assert ids.dtype == np.int64 and ids.shape == (120,) and label in (0, 1)
    val = SpamDataset(book_split[1], tokenizer, max_length=train.max_length)
    assert all(len(ids) == 120 for ids in val.encoded_texts)

    path = tmp_path / "train.csv"  # as the book's train_df.to_csv("train.csv", index=None) writes it
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Label", "Text"])
        writer.writerows([(0 if label == "ham" else 1, text) for label, text in book_split[0]])
    from_csv = SpamDataset(path, tokenizer)
    assert from_csv.max_length == 120 and from_csv.labels == train.labels
    assert from_csv.encoded_texts == train.encoded_texts

    cut = SpamDataset([("spam", "one two three four five"), ("ham", "hi")], tokenizer, max_length=3)
    assert [list(cut[i][0]) for i in range(2)] == [tokenizer.encode("one two three"), tokenizer.encode("hi") + [50256] * 2]


@pytest.mark.parametrize("content, message", [
    ("Text\nhello\n", "no Label column"),
    ("Label,Message\n0,hello\n", "no Text column"),
    ("Label,Text\n0,hello\nmaybe,hi\n", "row 2: unknown label 'maybe'"),
    ("Label,Text\n0,hello\n1,\n", "row 2: the text is empty"),
])
def test_a_bad_csv_is_named(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        SpamDataset(path, get_gpt2_tokenizer())


def test_texts_all_longer_than_max_length_are_refused():
    with pytest.raises(ValueError, match=r"every text of rows is longer than max_length=2 tokens \(the shortest has 3\)"):
        SpamDataset([("ham", "one two three"), ("spam", "four five six seven")], get_gpt2_tokenizer(), max_length=2)


def small_classifier(cfg, trainable="last-block", dtype="float64", seed=0):
    model = tl.GPTModel(cfg, dtype=dtype, seed=seed)
    return prepare_classifier(model, trainable=trainable, seed=seed)


TINY = {"vocab_size": 50257, "context_length": 12, "emb_dim": 8, "n_heads": 2, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}


def test_classify_review_truncates_pads_and_refuses_what_it_cannot_classify():
    tokenizer = get_gpt2_tokenizer()
    model = small_classifier(TINY)
    long_text = "free prize " * 50  # 100 tokens, cut to the 12 of the context as the book does
    assert classify_review(long_text, model, tokenizer, None, max_length=120) in ("spam", "not spam")
    assert classify_review("hi", model, tokenizer, "cpu", max_length=5) in ("spam", "not spam")
    with pytest.raises(ValueError, match="the text is empty"):
        classify_review("  ", model, tokenizer, None)
    with pytest.raises(ValueError, match="2-class output head.*has 50257 outputs"):
        classify_review("hi", tl.GPTModel(TINY), tokenizer, None)


def test_the_books_surgery_freezes_all_but_the_last_block_and_final_norm():
    cfg = {**tl.GPT_CONFIG_124M, "context_length": 8, "qkv_bias": True}
    model = prepare_classifier(tl.GPTModel(cfg, init_weights=False), trainable="last-block")
    block = 4 * 768 * 768 + 3 * 768 + 768 + 2 * 768 * 3072 + 3072 + 768 + 4 * 768  # attention, FFN, two norms
    assert model.num_parameters(trainable=True) == block + 2 * 768 + 768 * 2 + 2  # + final norm + the new head
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.startswith(("trf_blocks.11.", "final_norm.", "out_head.")) for name in trainable)
    assert prepare_classifier(model, trainable="head").num_parameters(trainable=True) == 768 * 2 + 2
    with pytest.raises(ValueError, match="trainable must be one of head, last-block, last-2, all"):
        prepare_classifier(model, trainable="first-block")


def test_data_loader_batches_any_dataset_and_shuffles_from_its_seed():
    items = [(np.full(3, i), i % 2) for i in range(10)]
    loader = DataLoader(items, batch_size=4, shuffle=True, drop_last=True, seed=1)
    assert len(loader) == 2 and len(DataLoader(items, batch_size=4)) == 3
    first, again = list(loader), list(DataLoader(items, batch_size=4, shuffle=True, drop_last=True, seed=1))
    inputs, labels = first[0]
    assert inputs.shape == (4, 3) and labels.dtype == np.int64 and labels.tolist() == (inputs[:, 0] % 2).tolist()
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))
    seen = np.concatenate([inputs[:, 0] for inputs, _ in loader])  # the second epoch: another order
    assert not np.array_equal(seen, np.concatenate([inputs[:, 0] for inputs, _ in first])) and len(set(seen)) == 8
    ordered = DataLoader(items, batch_size=3, collate_fn=lambda batch: [label for _, label in batch])
    assert list(ordered) == [[0, 1, 0], [1, 0, 1], [0, 1, 0], [1]]
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
        DataLoader(items, batch_size=0)


# ---- twins: the same steps in both libraries -------------------------------------------------


def batches_of(rng, n_batches, batch_size, length, vocab, pad_token_id=50256):
    """Random texts of 1..length tokens, right-padded as SpamDataset pads, and random labels."""
    out = []
    for _ in range(n_batches):
        ids = rng.integers(0, vocab, (batch_size, length))
        lengths = rng.integers(1, length + 1, batch_size)
        ids[np.arange(length)[None, :] >= lengths[:, None]] = pad_token_id
        out.append((ids, rng.integers(0, 2, batch_size)))
    return out


@settings(max_examples=6, deadline=None)
@given(n_layers=st.integers(1, 3), heads=st.sampled_from([1, 2]), trainable=st.sampled_from(["last-block", "all", "head", "last-2"]),
       token=st.sampled_from(["last", "last-real", "mean"]), dtype=st.sampled_from(["float64", "float32"]),
       seed=st.integers(0, 2**16))
def test_train_classifier_simple_matches_the_books_torch_loop(n_layers, heads, trainable, token, dtype, seed):
    cfg = {**TINY, "n_layers": n_layers, "n_heads": heads}
    rng = np.random.default_rng(seed)
    train_batches = batches_of(rng, 10, 3, 6, 60)
    val_batches = batches_of(rng, 3, 3, 6, 60)
    model = small_classifier(cfg, trainable, dtype, seed)
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    torch_model = torch_gpt.GPTModel(cfg).to(torch_dtype)
    torch_gpt.load_into_torch(torch_model, {k: v for k, v in model.state_dict().items() if not k.startswith("out_head")}
                              | {"out_head.weight": np.zeros((cfg["vocab_size"], cfg["emb_dim"]))})
    torch_classify.prepare_classifier(torch_model, {"weight": model.out_head.weight.numpy(),
                                                    "bias": model.out_head.bias.numpy()}, trainable)
    rtol = assert_same_classifier_runs(model, torch_model, train_batches, val_batches, dtype, token)
    torch_state = torch_gpt.from_torch_state_dict(torch_model.state_dict())
    for name, array in model.state_dict().items():
        atol = rtol * 1e-2
        if name.endswith("W_key.bias"):
            # Its gradient is 0 in exact arithmetic (q.b_k is the same for every key of a query, and
            # softmax ignores it), so both libraries step on rounding noise that AdamW scales up to
            # about lr: once that noise nears eps (float32), up to lr per step apart.
            atol = 20 * LR if dtype == "float32" else atol
        np.testing.assert_allclose(array, torch_state[name], rtol=rtol * 10, atol=atol, err_msg=name)
    for name, p in model.named_parameters():
        assert (p.grad is None) == (not p.requires_grad), name


def test_the_classifier_functions_follow_the_book():
    tokenizer = get_gpt2_tokenizer()
    rows = [("spam", "Win a free prize now"), ("ham", "See you at lunch"), ("ham", "ok"), ("spam", "Call to claim cash")]
    dataset = SpamDataset(rows, tokenizer)
    loader = DataLoader(dataset, batch_size=2)
    model = small_classifier(TINY)
    inputs, targets = next(iter(loader))
    assert inputs.shape == (2, dataset.max_length) and targets.tolist() == [1, 0]
    loss = calc_loss_batch(inputs, targets, model, None)
    assert loss.shape == () and loss.requires_grad
    assert calc_loss_loader(loader, model, None) == pytest.approx(np.mean(
        [calc_loss_batch(*batch, model, None).item() for batch in loader]), rel=1e-12)
    accuracy = calc_accuracy_loader(loader, model, None)
    assert accuracy in (0.0, 0.25, 0.5, 0.75, 1.0) and not model.training  # the book leaves eval mode on
    assert calc_accuracy_loader(loader, model, None, num_batches=1) in (0.0, 0.5, 1.0)
    train_loss, val_loss = evaluate_model(model, loader, loader, None, eval_iter=1)
    assert model.training and train_loss == val_loss
