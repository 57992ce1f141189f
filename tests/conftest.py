"""Shared test setup: where the data files are, and the hypothesis profiles."""
import os
from pathlib import Path

from hypothesis import HealthCheck, settings

# The registry reads TINYGRAD_LLM_DATA; the Makefile exports it, a bare pytest run finds
# the files beside the checkout.
os.environ.setdefault("TINYGRAD_LLM_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

# "ci" (when the environment sets CI) replays the same examples on every run; "dev" draws
# new ones and more of them. No deadline: the first example of a test may load a tokenizer.
settings.register_profile("ci", max_examples=50, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
