"""Chapter 5 exercises: the cross-entropy's gradient, an AdamW step, temperature, top-k and top-p."""
import hypothesis.strategies as st
import numpy as np
from hypothesis import assume

from .exercise import Exercise, Mistake, Tolerance
from .strategies import large, side, softmax_rows, values

# ---- cross_entropy_backward ------------------------------------------------------------------


@st.composite
def _cross_entropy_inputs(draw):
    N, V = draw(side(1, 4)), draw(side(1, 5))
    return {"logits": draw(large((N, V))), "targets": np.array(draw(st.lists(st.integers(0, V - 1),
                                                                                  min_size=N, max_size=N)))}


def _onehot(targets, V):
    return np.eye(V)[targets]


CROSS_ENTROPY_BACKWARD = Exercise(
    name="cross_entropy_backward",
    chapter="chapter 5",
    signature="cross_entropy_backward(logits, targets) -> dlogits",
    task="""
The training loss: logits (N, V) for N positions over a vocabulary of V, integer targets
(N,), and the mean over positions of the negative log-likelihood
    L = (1/N) sum_n [ logsumexp(logits[n]) - logits[n, targets[n]] ].
Return dL/dlogits (N, V):
    dlogits[n] = (softmax(logits[n]) - onehot(targets[n])) / N.
Logits can be large (1000 and more): subtract each row's maximum before exp().
""",
    inputs=_cross_entropy_inputs(),
    reference="reference.exercises:cross_entropy_backward",
    tolerance=Tolerance(1e-9, 1e-12, "float64; the softmax's row sum in another order, a few ulps"),
    outputs=("dlogits",),
    mistakes=(
        Mistake("the -1 at each target is missing: dlogits = (softmax - onehot(targets)) / N",
                lambda logits, targets: softmax_rows(logits) / len(targets)),
    ),
)

# ---- softmax_with_temperature ------------------------------------------------------------------


@st.composite
def _temperature_inputs(draw):
    shape = draw(st.sampled_from(((5,), (1, 5), (2, 3), (3, 1))))
    # Small temperatures turn logits of 30 into 3000: exp() overflows unless the maximum is subtracted.
    return {"logits": draw(values(shape, 30.0)), "temperature": draw(st.sampled_from((0.01, 0.5, 1.0, 1.5, 5.0)))}


SOFTMAX_WITH_TEMPERATURE = Exercise(
    name="softmax_with_temperature",
    chapter="chapter 5",
    signature="softmax_with_temperature(logits, temperature) -> probs",
    task="""
The book's temperature scaling: the logits (V,) or (B, V) are divided by the temperature
before the softmax over the last axis,
    probs = softmax(logits / temperature).
Temperatures above 1 flatten the distribution, below 1 sharpen it. With a small
temperature the scaled logits are large: subtract each row's maximum before exp().
""",
    inputs=_temperature_inputs(),
    reference="reference.exercises:softmax_with_temperature",
    tolerance=Tolerance(1e-9, 1e-14, "float64; exp and a row sum in another order"),
    outputs=("probs",),
    mistakes=(
        Mistake("the logits are multiplied by the temperature; divide them by it",
                lambda logits, temperature: softmax_rows(logits * temperature)),
        Mistake("the softmax runs over the wrong axis: normalise each row (the last axis)",
                lambda logits, temperature: np.swapaxes(softmax_rows(np.swapaxes(logits / temperature, 0, -1)), 0, -1)),
    ),
)

# ---- top_k_filter ------------------------------------------------------------------------------


@st.composite
def _top_k_inputs(draw):
    V = draw(side(1, 6))
    shape = draw(st.sampled_from(((V,), (1, V), (2, V), (3, V))))
    # Logits from a few values, so ties at the k-th largest are common.
    pool = draw(st.lists(st.floats(-10, 10), min_size=1, max_size=4, unique=True))
    logits = np.array(draw(st.lists(st.sampled_from(pool), min_size=int(np.prod(shape)),
                                    max_size=int(np.prod(shape))))).reshape(shape)
    return {"logits": logits, "top_k": draw(st.integers(1, V))}


def _kth_largest(logits, k):
    return np.sort(logits, axis=-1)[..., -k, None]


def _drops_ties(inputs, expected, received):
    """Fewer tokens kept than the reference keeps, each dropped one tied with a kept one of its row.

    Which of two tied tokens a sort puts first is arbitrary, so this mistake has no one answer.
    """
    logits = inputs["logits"].reshape(-1, inputs["logits"].shape[-1])
    kept = np.isfinite(np.asarray(received, float)).reshape(logits.shape)
    kept_expected = np.isfinite(expected).reshape(logits.shape)
    if not (np.all(~kept | kept_expected) and np.any(kept_expected & ~kept)):
        return False
    return all(np.isin(row[want & ~got], row[got]).all() for row, got, want in zip(logits, kept, kept_expected))


TOP_K_FILTER = Exercise(
    name="top_k_filter",
    chapter="chapter 5",
    signature="top_k_filter(logits, top_k) -> logits",
    task="""
The book's top-k sampling filter: in each row of logits ((V,) or (B, V)), every logit
smaller than the row's top_k-th largest becomes -inf; the others keep their value. Logits
tied with the top_k-th largest are kept, so a row can keep more than top_k tokens.
(torch: min_val = torch.topk(logits, top_k).values[..., -1:], then
torch.where(logits < min_val, -inf, logits).) 1 <= top_k <= V.
""",
    inputs=_top_k_inputs(),
    reference="reference.exercises:top_k_filter",
    tolerance=Tolerance(0.0, 0.0, "kept logits are copied, the others are exactly -inf"),
    outputs=("logits",),
    mistakes=(
        Mistake("off by one: top_k + 1 tokens kept; the threshold is the top_k-th largest, not the (top_k + 1)-th",
                lambda logits, top_k: np.where(logits < _kth_largest(logits, min(top_k + 1, logits.shape[-1])),
                                               -np.inf, logits)),
        Mistake("off by one: top_k - 1 tokens kept; logits equal to the top_k-th largest stay",
                lambda logits, top_k: np.where(logits <= _kth_largest(logits, top_k), -np.inf, logits)),
        Mistake("ties dropped: every logit equal to the top_k-th largest is kept, even beyond top_k tokens",
                test=_drops_ties),
        Mistake("the filtered logits must become -inf, not 0",
                lambda logits, top_k: np.where(logits < _kth_largest(logits, top_k), 0.0, logits)),
    ),
)

# ---- top_p_filter ------------------------------------------------------------------------------


def _mass_above(probs):
    # for each token, the probability of the tokens strictly more likely than it
    return (probs[..., None, :] * (probs[..., None, :] > probs[..., :, None])).sum(axis=-1)


@st.composite
def _top_p_inputs(draw):
    V = draw(side(1, 6))
    shape = draw(st.sampled_from(((V,), (1, V), (2, V))))
    pool = draw(st.lists(st.floats(-8, 8), min_size=1, max_size=4, unique=True))
    logits = np.array(draw(st.lists(st.sampled_from(pool), min_size=int(np.prod(shape)),
                                    max_size=int(np.prod(shape))))).reshape(shape)
    top_p = draw(st.floats(0.05, 1.0))
    # Where a running sum sits within rounding of top_p, both answers are right: skip those draws.
    assume(np.abs(_mass_above(softmax_rows(logits)) - top_p).min() > 1e-9)
    return {"logits": logits, "top_p": top_p}


def _top_p_variant(logits, top_p, reaching_kept=True, as_probs=False):
    probs = softmax_rows(logits)
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=-1)
    before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the tokens sorted before each
    kept_sorted = before < top_p if reaching_kept else np.cumsum(sorted_probs, axis=-1) < top_p
    keep = np.zeros(probs.shape, bool)
    np.put_along_axis(keep, order, kept_sorted, axis=-1)
    cutoff = np.where(keep, probs, np.inf).min(axis=-1, keepdims=True)  # ties with the last kept stay
    keep = probs >= cutoff
    return np.where(keep, probs if as_probs else logits, -np.inf)


TOP_P_FILTER = Exercise(
    name="top_p_filter",
    chapter="chapter 5",
    signature="top_p_filter(logits, top_p) -> logits",
    task="""
Nucleus (top-p) filtering of logits (V,) or (B, V), row by row, with 0 < top_p <= 1:
p = softmax(logits). Sort the tokens from most to least probable and keep them until
their cumulative probability first reaches top_p (the token that reaches it is kept).
Every token tied in probability with the last kept one is kept too. The kept logits keep
their value; every other logit becomes -inf. Return logits, not probabilities.
Equivalently: a token is kept when the tokens strictly more probable than it hold less
than top_p of the probability (reference/sampling.py's rule).
""",
    inputs=_top_p_inputs(),
    reference="reference.exercises:top_p_filter",
    tolerance=Tolerance(0.0, 0.0, "kept logits are copied, the others are exactly -inf"),
    outputs=("logits",),
    weight=2,
    mistakes=(
        Mistake("off by one: the token whose probability takes the running sum to top_p is kept too",
                lambda logits, top_p: _top_p_variant(logits, top_p, reaching_kept=False)),
        Mistake("ties dropped: tokens as probable as the last kept one are kept too", test=_drops_ties),
        Mistake("probabilities returned: return the logits, with -inf outside the nucleus",
                lambda logits, top_p: _top_p_variant(logits, top_p, as_probs=True)),
    ),
)

# ---- adamw_step --------------------------------------------------------------------------------


@st.composite
def _adamw_inputs(draw):
    shape = draw(st.sampled_from(((1,), (3,), (2, 3), (1, 4))))
    beta1, beta2 = draw(st.sampled_from(((0.9, 0.999), (0.8, 0.95), (0.5, 0.9))))
    return {"param": draw(values(shape)), "grad": draw(values(shape)),
            "exp_avg": draw(values(shape, 0.5)), "exp_avg_sq": draw(values(shape, 0.5)) ** 2,
            "step": draw(st.integers(1, 5)), "lr": draw(st.sampled_from((1e-3, 0.1))),
            "betas": (beta1, beta2), "eps": draw(st.sampled_from((1e-8, 1e-3))),
            "weight_decay": draw(st.sampled_from((0.0, 0.01, 0.1)))}


def _adamw_variant(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
                   bias_correction=True, coupled_decay=False, decay_times_lr=True, eps_inside=False,
                   step_offset=0, sign=1.0):
    beta1, beta2 = betas
    t = step + step_offset
    if coupled_decay:
        grad = grad + weight_decay * param
    else:
        param = param * (1 - (lr * weight_decay if decay_times_lr else weight_decay))
    m = beta1 * exp_avg + (1 - beta1) * grad
    v = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    m_hat, v_hat = (m / (1 - beta1 ** t), v / (1 - beta2 ** t)) if bias_correction else (m, v)
    denominator = np.sqrt(v_hat + eps) if eps_inside else np.sqrt(v_hat) + eps
    return param - sign * lr * m_hat / denominator, m, v


ADAMW_STEP = Exercise(
    name="adamw_step",
    chapter="chapter 5",
    signature="adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay) "
              "-> (param, exp_avg, exp_avg_sq)",
    task="""
One step of torch.optim.AdamW, the optimizer the book trains with. step >= 1 counts this
step (1 for the first); betas = (beta1, beta2). Return the new param, exp_avg, exp_avg_sq:
    param      = param * (1 - lr * weight_decay)               (decoupled weight decay, first)
    exp_avg    = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad^2
    m_hat = exp_avg / (1 - beta1^step),  v_hat = exp_avg_sq / (1 - beta2^step)   (bias correction)
    param      = param - lr * m_hat / (sqrt(v_hat) + eps)
""",
    inputs=_adamw_inputs(),
    reference="reference.exercises:adamw_step",
    tolerance=Tolerance(1e-10, 1e-12, "float64; torch folds the bias corrections into a step size "
                                       "and rounds in another order, a few ulps"),
    outputs=("param", "exp_avg", "exp_avg_sq"),
    weight=2,
    mistakes=(
        Mistake("the bias correction is missing: divide the moments by (1 - beta^step)",
                lambda **a: _adamw_variant(**a, bias_correction=False)),
        Mistake("the weight decay is coupled (added to the gradient, Adam with L2); AdamW decays the "
                "parameter itself: param *= 1 - lr * weight_decay",
                lambda **a: _adamw_variant(**a, coupled_decay=True)),
        Mistake("the weight decay is not multiplied by lr: param *= 1 - lr * weight_decay",
                lambda **a: _adamw_variant(**a, decay_times_lr=False)),
        Mistake("eps is inside the square root: divide by sqrt(v_hat) + eps",
                lambda **a: _adamw_variant(**a, eps_inside=True)),
        Mistake("the bias correction is off by one step: `step` already counts this step (1 on the first)",
                lambda **a: _adamw_variant(**a, step_offset=1)),
        Mistake("the bias correction is off by one step: `step` already counts this step (1 on the first)",
                lambda **a: _adamw_variant(**a, step_offset=-1) if a["step"] > 1 else None),
        Mistake("a sign error: the parameter moves along the gradient; step against it (param - lr * ...)",
                lambda **a: _adamw_variant(**a, sign=-1.0)),
    ),
)

EXERCISES = (CROSS_ENTROPY_BACKWARD, ADAMW_STEP, SOFTMAX_WITH_TEMPERATURE, TOP_K_FILTER, TOP_P_FILTER)
