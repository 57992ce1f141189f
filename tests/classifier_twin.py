"""One chapter 6 run in both libraries: the book's loop here and in reference/classify.py."""
import numpy as np
import torch

import tinygrad_llm as tl
from reference import classify as torch_classify
from tinygrad_llm.finetune.classify import train_classifier_simple

LR = 5e-3


def assert_same_classifier_runs(model, torch_model, train_batches, val_batches, dtype, token):
    """20 AdamW steps of train_classifier_simple in both from the same weights and batches: the
    same losses at each of the 7 evaluations and the same accuracies and examples seen.
    Returns the relative tolerance of the losses, for the caller's comparison of the weights."""
    ours = tl.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)  # the book's call: frozen ones skipped
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=LR, weight_decay=0.1)
    run = dict(num_epochs=2, eval_freq=3, eval_iter=2, token=token)  # 20 steps, 7 evaluations, 2 accuracies
    got = train_classifier_simple(model, train_batches, val_batches, ours, "cpu", **run, progress=False)
    expected = torch_classify.train_classifier_simple(torch_model, train_batches, val_batches, theirs, "cpu", **run)

    # float64 agrees to rounding; float32 to its precision after 20 steps of AdamW
    rtol = 1e-9 if dtype == "float64" else 1e-4
    for name, ours_values, torch_values in zip(("train loss", "val loss"), got[:2], expected[:2]):
        assert len(ours_values) == len(torch_values) == 7
        np.testing.assert_allclose(ours_values, torch_values, rtol=rtol, err_msg=name)
    assert got[2:] == expected[2:]  # the accuracies and the examples seen
    return rtol
