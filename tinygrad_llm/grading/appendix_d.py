"""Appendix D exercises: the warmup + cosine learning-rate schedule, and gradient clipping."""
import math

import hypothesis.strategies as st
import numpy as np

from .exercise import Exercise, Mistake, Tolerance
from .strategies import values

# ---- warmup_cosine_lr ----------------------------------------------------------------------


@st.composite
def _schedule_inputs(draw):
    total_steps = draw(st.integers(2, 200))
    warmup_steps = draw(st.integers(1, total_steps - 1))
    peak_lr = draw(st.sampled_from((1e-3, 5e-4, 0.1)))
    return {"step": draw(st.integers(0, total_steps - 1)), "peak_lr": peak_lr, "total_steps": total_steps,
            "warmup_steps": warmup_steps, "initial_lr": draw(st.sampled_from((0.0, 1e-5, 3e-5))),
            "min_lr": draw(st.sampled_from((0.0, 1e-5, 1e-4)))}


def _schedule_variant(step, peak_lr, total_steps, warmup_steps, initial_lr, min_lr, warmup_offset=0,
                      half=True, floor=True, over_total=False):
    if step < warmup_steps:
        return initial_lr + (step + warmup_offset) * (peak_lr - initial_lr) / warmup_steps
    progress = (step - warmup_steps) / (total_steps if over_total else total_steps - warmup_steps)
    low = min_lr if floor else 0.0
    return low + (peak_lr - low) * (0.5 if half else 1.0) * (1 + math.cos(math.pi * progress))


WARMUP_COSINE_LR = Exercise(
    name="warmup_cosine_lr",
    chapter="appendix D",
    signature="warmup_cosine_lr(step, peak_lr, total_steps, warmup_steps, initial_lr, min_lr) -> lr",
    task="""
The learning rate of appendix D's training loop at `step` (0, 1, ..., total_steps - 1):
a linear warmup from initial_lr, then cosine annealing from peak_lr down to min_lr.
    step < warmup_steps:  lr = initial_lr + step * (peak_lr - initial_lr) / warmup_steps
    otherwise:            progress = (step - warmup_steps) / (total_steps - warmup_steps)
                          lr = min_lr + (peak_lr - min_lr) * 0.5 * (1 + cos(pi * progress))
Return a Python float.
""",
    inputs=_schedule_inputs(),
    reference="reference.exercises:warmup_cosine_lr",
    tolerance=Tolerance(1e-12, 1e-15, "float64 arithmetic on scalars, a few ulps"),
    outputs=("lr",),
    mistakes=(
        Mistake("the warmup is one step ahead: at step 0 the rate is initial_lr (step, not step + 1)",
                lambda **a: _schedule_variant(**a, warmup_offset=1)),
        Mistake("the cosine is missing its 0.5: 0.5 * (1 + cos(...)) goes from 1 to 0",
                lambda **a: _schedule_variant(**a, half=False)),
        Mistake("the cosine decays to 0; it ends at min_lr: min_lr + (peak_lr - min_lr) * ...",
                lambda **a: _schedule_variant(**a, floor=False)),
        Mistake("progress is measured over total_steps; the decay spans total_steps - warmup_steps",
                lambda **a: _schedule_variant(**a, over_total=True)),
    ),
)

# ---- clip_grad_norm ---------------------------------------------------------------------------


@st.composite
def _clip_inputs(draw):
    shapes = draw(st.lists(st.sampled_from(((1,), (3,), (2, 2), (1, 3))), min_size=1, max_size=3))
    scale = draw(st.sampled_from((0.01, 1.0, 1e3)))  # small grads are left alone, large ones clipped
    return {"grads": [draw(values(s)) * scale for s in shapes], "max_norm": draw(st.sampled_from((0.5, 1.0, 5.0)))}


def _clip_variant(grads, max_norm, per_tensor=False, always=False, squared=False, plus_eps=True):
    norms = [float(np.sqrt((g * g).sum())) for g in grads]
    total = float(sum(n * n for n in norms)) if squared else math.sqrt(sum(n * n for n in norms))

    def factor(norm):
        f = max_norm / (norm + (1e-6 if plus_eps else 0.0))
        return f if always else min(f, 1.0)

    if per_tensor:
        return [g * factor(n) for g, n in zip(grads, norms)], total
    return [g * factor(total) for g in grads], total


CLIP_GRAD_NORM = Exercise(
    name="clip_grad_norm",
    chapter="appendix D",
    signature="clip_grad_norm(grads, max_norm) -> (grads, total_norm)",
    task="""
Gradient clipping as torch.nn.utils.clip_grad_norm_, used by appendix D's loop. `grads`
is a list of arrays (one per parameter). Their joint L2 norm is
    total_norm = sqrt(sum over every array and element of g^2).
When max_norm / (total_norm + 1e-6) < 1, every array is multiplied by that one factor;
otherwise they stay as they are. Return the list of (possibly scaled) arrays and
total_norm, the norm before clipping, as a float.
""",
    inputs=_clip_inputs(),
    reference="reference.exercises:clip_grad_norm",
    tolerance=Tolerance(1e-10, 1e-14, "float64; a sum of squares in another order, a few ulps"),
    outputs=("grads", "total_norm"),
    mistakes=(
        Mistake("each array is clipped by its own norm; clipping uses the joint norm of all of them",
                lambda **a: _clip_variant(**a, per_tensor=True)),
        Mistake("small gradients are scaled up too: scale only when max_norm / (norm + 1e-6) < 1",
                lambda **a: _clip_variant(**a, always=True)),
        Mistake("the squared norm is used: total_norm = sqrt(sum of g^2)",
                lambda **a: _clip_variant(**a, squared=True)),
        Mistake("the factor is max_norm / (total_norm + 1e-6), as torch's, with its 1e-6",
                lambda **a: _clip_variant(**a, plus_eps=False)),
    ),
)

EXERCISES = (WARMUP_COSINE_LR, CLIP_GRAD_NORM)
