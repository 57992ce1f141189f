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

# ---- the "cuda" device: CuPy on a GPU, else the CPU stand-in --------------------------------
#
# TINYGRAD_LLM_TEST_CUDA chooses what device "cuda" is in the tests: "cupy" (CuPy on a GPU;
# an error when there is none), "standin" (tests/cupy_standin.py: NumPy underneath, CuPy's
# rules about the host), or unset: CuPy when it finds a GPU, else the stand-in.

import pytest  # noqa: E402

from tests import cupy_standin  # noqa: E402
from tinygrad_llm import backend  # noqa: E402

_wanted_cuda = os.environ.get("TINYGRAD_LLM_TEST_CUDA", "")
if _wanted_cuda not in ("", "cupy", "standin"):
    raise pytest.UsageError(f"TINYGRAD_LLM_TEST_CUDA={_wanted_cuda!r}: expected 'cupy', 'standin' or unset")
if _wanted_cuda == "standin":
    backend.use_cuda_module(cupy_standin)
else:
    try:
        backend._cupy()
    except RuntimeError:
        if _wanted_cuda == "cupy":
            raise
        backend.use_cuda_module(cupy_standin)
CUDA_IS_STANDIN = not backend.cuda_is_cupy()


def pytest_report_header(config):
    return f"device 'cuda' in the tests: {'the CPU stand-in for CuPy' if CUDA_IS_STANDIN else 'CuPy on a GPU'}"


@pytest.fixture(scope="session", params=["cpu", "cuda"])
def device(request):
    """Each device test runs on the CPU and on "cuda" (a GPU, or in CI the stand-in)."""
    return request.param


@pytest.fixture
def standin_cuda():
    """Device "cuda" is the stand-in for this test (even on a GPU machine), with its copy
    counter reset: for tests that count host <-> device transfers."""
    previous = backend.use_cuda_module(cupy_standin)
    cupy_standin.reset_transfers()
    yield cupy_standin.transfers
    backend.use_cuda_module(previous)
