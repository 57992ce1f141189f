"""Text generation in PyTorch as the book writes it: the greedy loop and the sampling filters.

tests/test_generate.py compares tinygrad_llm.generate against these. The greedy loop is
the book's chapter 4 `generate_text_simple`; top-k is its chapter 5 code. Top-p (nucleus sampling) is not in the book; it is written here
from its definition, independently of the library's sort-and-cut-off version: a token is
kept when the tokens strictly more probable than it hold less than `top_p` of the mass, so
the most probable tokens are kept until their sum first reaches top_p (ties kept together).
The whole sampling distribution (temperature, then top-k, then top-p) is transformers' own.
"""
import torch


def generate_text_simple(model, idx, max_new_tokens, context_size):
    """The book's greedy loop: run the last `context_size` tokens, append the most likely next one."""
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        probas = torch.softmax(logits[:, -1, :], dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def top_k_filter(logits, top_k):
    """The book's top-k: logits below the k-th largest become -inf. logits: (B, V)."""
    top_logits, _ = torch.topk(logits, top_k)
    min_val = top_logits[:, -1:]
    return torch.where(logits < min_val, torch.tensor(float("-inf"), dtype=logits.dtype), logits)


def mass_above(probs):
    """For each token, the probability mass of the tokens strictly more probable than it. probs: (B, V)."""
    more_probable = probs[:, None, :] > probs[:, :, None]  # [b, i, j]: token j beats token i
    return (more_probable * probs[:, None, :]).sum(dim=-1)


def top_p_filter(logits, top_p):
    """Nucleus filter: logits of tokens outside the nucleus become -inf. logits: (B, V)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.where(mass_above(probs) < top_p, logits, torch.tensor(float("-inf"), dtype=logits.dtype))


def transformers_distribution(logits, temperature, top_k=None, top_p=None):
    """The probabilities transformers' sampling draws from: its own temperature, top-k and top-p
    warpers, in the order its generate() applies them. logits: (B, V)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(temperature)]
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    scores = logits
    for warper in warpers:
        scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)
