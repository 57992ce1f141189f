"""Chapter 8 exercise: the DPO loss and the rewards the book logs."""
import hypothesis.strategies as st
import numpy as np

from .exercise import Exercise, Mistake, Tolerance
from .strategies import side


@st.composite
def _dpo_inputs(draw):
    B = draw(side(1, 4))
    # Mean log-probabilities of the selected tokens: at most 0, far below it for a bad answer.
    logprobs = st.lists(st.floats(-200.0, 0.0), min_size=B, max_size=B).map(np.array)
    return {"model_chosen_logprobs": draw(logprobs), "model_rejected_logprobs": draw(logprobs),
            "reference_chosen_logprobs": draw(logprobs), "reference_rejected_logprobs": draw(logprobs),
            "beta": draw(st.sampled_from((0.1, 0.5, 10.0)))}


def _dpo(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs, reference_rejected_logprobs,
         beta, sign=1.0, scale_logits=True, rewards_times_beta=False, reduce=np.mean):
    logits = (model_chosen_logprobs - model_rejected_logprobs) - (reference_chosen_logprobs - reference_rejected_logprobs)
    z = sign * (beta * logits if scale_logits else logits)
    loss = reduce(np.logaddexp(0.0, -z))  # -log sigmoid(z)
    factor = beta if rewards_times_beta else 1.0
    return (float(loss), float(factor * np.mean(model_chosen_logprobs - reference_chosen_logprobs)),
            float(factor * np.mean(model_rejected_logprobs - reference_rejected_logprobs)))


DPO_LOSS = Exercise(
    name="dpo_loss",
    chapter="chapter 8",
    signature="dpo_loss(model_chosen_logprobs, model_rejected_logprobs, reference_chosen_logprobs, "
              "reference_rejected_logprobs, beta) -> (loss, chosen_rewards, rejected_rewards)",
    task="""
Direct preference optimisation's loss as the book computes it (compute_dpo_loss). Each
input is a (B,) array of mean log-probabilities of a response: the policy model's (model_)
and the frozen reference model's (reference_), for the chosen and the rejected answer.
    logits = (model_chosen - model_rejected) - (reference_chosen - reference_rejected)
    loss = mean over the batch of -log sigmoid(beta * logits)
    chosen_rewards = mean of (model_chosen - reference_chosen)        (no beta, as the book logs them)
    rejected_rewards = mean of (model_rejected - reference_rejected)
Return the three as floats. beta * logits can reach thousands: -log sigmoid(z) =
log(1 + exp(-z)) overflows written that way; np.logaddexp(0, -z) does not.
""",
    inputs=_dpo_inputs(),
    reference="reference.exercises:dpo_loss",
    tolerance=Tolerance(1e-9, 1e-12, "float64; logsigmoid and a mean of a few terms in another order"),
    outputs=("loss", "chosen_rewards", "rejected_rewards"),
    weight=2,
    mistakes=(
        Mistake("a sign error: the loss is -log sigmoid(+beta * logits), lower when the chosen answer gains",
                lambda **a: _dpo(**a, sign=-1.0)),
        Mistake("beta is missing: the loss is -log sigmoid(beta * logits)",
                lambda **a: _dpo(**a, scale_logits=False)),
        Mistake("the rewards are logged without beta: mean(model - reference)",
                lambda **a: _dpo(**a, rewards_times_beta=True)),
        Mistake("the loss is summed over the batch: a missing 1/N (take the mean)",
                lambda **a: _dpo(**a, reduce=np.sum)),
    ),
)

EXERCISES = (DPO_LOSS,)
