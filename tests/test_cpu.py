"""tinygrad_llm.cpu: split matmuls and threaded pieces give what one NumPy call gives.

The ops only split work that is large (SPLIT_FLOPS, BLOCK), so these tests lower the
thresholds to reach the split paths with small arrays.
"""
import platform

import numpy as np
import pytest

import tinygrad_llm as tl
import tinygrad_llm.functional as F
from tinygrad_llm import cpu

# float64 throughout: a piece of a matmul runs the same BLAS dot products as the whole, so
# only the kernel's blocking at the piece's edges may round differently, by a few ulps.
RTOL = 1e-13


@pytest.fixture
def split_everything(monkeypatch):
    """Two threads, and every matmul and row-wise op split however small; counts the pieces."""
    if cpu._openblas is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS whose threads can be set: matmuls are not split")
    previous = cpu.get_num_threads()
    cpu.set_num_threads(2)
    monkeypatch.setattr(cpu, "SPLIT_FLOPS", 0)
    monkeypatch.setattr(cpu, "BLOCK", 8)
    calls = []
    whole = cpu._matmul_into
    monkeypatch.setattr(cpu, "_matmul_into", lambda a, b, out: (calls.append(out.shape), whole(a, b, out)))
    yield calls
    cpu.set_num_threads(previous)


MATMULS = {
    "rows": ((40, 7), (7, 5)),           # more rows than columns: cut the rows of a
    "columns": ((5, 7), (7, 40)),        # cut the columns of b
    "heads": ((2, 6, 9, 4), (2, 6, 4, 9)),   # a batch axis with a piece per thread
    "broadcast": ((3, 9, 4), (4, 9)),    # b is shared by the batch: cut the rows
}


@pytest.mark.parametrize("case", MATMULS)
def test_split_matmul_equals_numpy(split_everything, case):
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(shape) for shape in MATMULS[case])
    np.testing.assert_allclose(cpu.matmul(a, b), a @ b, rtol=RTOL)
    assert len(split_everything) == 2
    # Transposed views (strided operands, as the backward passes use) split the same way.
    np.testing.assert_allclose(cpu.matmul(b.swapaxes(-1, -2), a.swapaxes(-1, -2)),
                               b.swapaxes(-1, -2) @ a.swapaxes(-1, -2), rtol=RTOL)


def test_vectors_and_small_matmuls_are_not_split(split_everything, monkeypatch):
    a = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(cpu.matmul(a, np.ones(3)), a @ np.ones(3))
    monkeypatch.setattr(cpu, "SPLIT_FLOPS", 1 << 24)
    np.testing.assert_array_equal(cpu.matmul(a, a.T), a @ a.T)
    assert split_everything == []


@pytest.mark.parametrize("rows, columns", [(1100, 8), (1024, 3), (1100, 1), (40, 8)])
def test_thin_matmul_in_row_blocks_equals_numpy(rows, columns):
    # 1100 rows: two whole blocks of THIN_BLOCK_ROWS and a short one; 1024: blocks only;
    # one column and few rows: a single call. b is a transposed view, as linear passes it.
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((rows, 16)), rng.standard_normal((columns, 16)).T
    np.testing.assert_allclose(cpu.matmul_thin(a, b), a @ b, rtol=RTOL)


class RecordsBlasThreads(np.ndarray):
    """An array whose matmuls note how many threads OpenBLAS had when they ran."""
    seen = []

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        RecordsBlasThreads.seen.append(cpu._openblas[1]())
        inputs = tuple(x.view(np.ndarray) if isinstance(x, RecordsBlasThreads) else x for x in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(x.view(np.ndarray) for x in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)


def test_openblas_spins_up_its_threads_only_for_thin_matmuls():
    # OpenBLAS's threads spin after a call and take a core from the next split matmul, so
    # beside our threads OpenBLAS runs on one; a decoding step's thin matmuls use all.
    if cpu._openblas is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS whose threads can be set")
    previous = cpu.get_num_threads()
    try:
        cpu.set_num_threads(2)
        assert cpu._openblas[1]() == 1
        rng = np.random.default_rng(3)
        for rows in (1100, 40):  # in blocks, and in one call
            a, b = rng.standard_normal((rows, 16)).view(RecordsBlasThreads), rng.standard_normal((16, 4))
            RecordsBlasThreads.seen = []
            np.testing.assert_allclose(cpu.matmul_thin(a, b), a.view(np.ndarray) @ b, rtol=RTOL)
            assert RecordsBlasThreads.seen and set(RecordsBlasThreads.seen) == {2}
            assert cpu._openblas[1]() == 1
        with cpu.blas_threads(2):  # a matmul of one's own on OpenBLAS's threads
            assert cpu._openblas[1]() == 2
        assert cpu._openblas[1]() == 1
        cpu.set_num_threads(1)  # plain NumPy: OpenBLAS on the count it started with
        assert cpu._openblas[1]() == cpu._openblas_own_threads
        cpu.use_cores(1)  # an MPI rank on one core: no thread beyond it
        assert cpu._openblas[1]() == 1
    finally:
        cpu.set_num_threads(previous)


def test_parallel_map_keeps_order_and_raises():
    assert cpu.parallel_map(lambda x, y: x * y, [(i, 2) for i in range(10)]) == [2 * i for i in range(10)]

    def fail(i):
        if i == 3:
            raise ValueError("task 3")
        return i

    with pytest.raises(ValueError, match="task 3"):
        cpu.parallel_map(fail, [(i,) for i in range(6)])


def test_pieces_cover_the_range():
    assert cpu.pieces(10, 3) == (slice(0, 3), slice(3, 6), slice(6, 10))
    assert cpu.pieces(2, 4) == (slice(0, 1), slice(1, 2))  # never an empty piece
    assert cpu.row_blocks(4, 2 * cpu.BLOCK) == cpu.pieces(4, 8)


def test_set_num_threads_refuses_zero():
    with pytest.raises(ValueError, match="at least 1, got 0"):
        cpu.set_num_threads(0)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_reuse_is_set_unless_turned_off(monkeypatch):
    assert cpu.reuse_freed_memory() is True
    monkeypatch.setenv("TINYGRAD_LLM_MALLOC", "system")
    assert cpu.reuse_freed_memory() is False


def gradients(model, idx, targets):
    model.zero_grad()
    F.cross_entropy(model(idx), targets).backward()
    return {name: p.grad.copy() for name, p in model.named_parameters()}


def test_a_split_training_step_equals_the_serial_one(split_everything):
    # Every matmul of the model (projections, attention, head) and the cross-entropy rows
    # go through the threads here; the step must not notice.
    cfg = {"vocab_size": 37, "context_length": 8, "emb_dim": 12, "n_heads": 2, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": True}
    model = tl.GPTModel(cfg, dtype="float64", seed=0)
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, 37, (3, 8)), rng.integers(0, 37, (3, 8))
    split = gradients(model, idx, targets)
    assert len(split_everything) > 10
    cpu.set_num_threads(1)
    serial = gradients(model, idx, targets)
    for name in serial:
        np.testing.assert_allclose(split[name], serial[name], rtol=1e-12, atol=1e-14, err_msg=name)


def test_independent_matmuls_run_whole_one_per_thread(split_everything):
    rng = np.random.default_rng(2)
    d, w, x = rng.standard_normal((9, 5)), rng.standard_normal((5, 7)), rng.standard_normal((9, 7))
    dx, dw = cpu.matmuls([(d, w), (d.T, x)])  # a linear's backward: dx and dW
    np.testing.assert_allclose(dx, d @ w, rtol=RTOL)
    np.testing.assert_allclose(dw, d.T @ x, rtol=RTOL)
    assert sorted(split_everything) == [(5, 7), (9, 7)]  # two tasks, each a whole matmul
