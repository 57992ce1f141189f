"""How a training step uses the CPU: memory that is reused, and work split over the cores.

NumPy runs elementwise code on one core and leaves matmuls to BLAS's own threads. Three
things make a step fast on a few cores instead:

- `reuse_freed_memory`: glibc keeps freed memory for the next allocation (done at import).
- `parallel_map`: independent pieces of memory-bound array code (an optimizer update,
  the rows of a softmax) run on a thread per core; NumPy releases the GIL in its loops.
- `matmul`: a matmul is split into one piece per thread, each a single-threaded BLAS
  call. OpenBLAS's own threads meet at a barrier inside every call, so when another
  process holds a core every call waits for it, and the many small matmuls of attention
  can take a hundred times longer. Independent pieces only meet at the end.

While these threads do the parallel work, OpenBLAS runs on one thread, except inside
`matmul_thin` (a decoding step's few-row products). After a call OpenBLAS's threads spin
for a while before they sleep, and a spinning thread takes a core from the next split
matmul: one stray BLAS call in a layer norm made a GPT-2 355M step 1.6x slower. Importing
the library so sets OpenBLAS for the whole process: `blas_threads(n)` gives a block of one's
own NumPy code n threads, `set_num_threads(1)` gives NumPy back its own count.

The thread count is the first of TINYGRAD_LLM_NUM_THREADS, OPENBLAS_NUM_THREADS and
OMP_NUM_THREADS that is set, else the cores this process may use; `set_num_threads`
changes it. With one thread everything runs as plain NumPy.
"""
import contextlib
import ctypes
import functools
import itertools
import math
import os
import sys
import threading

import numpy as np

from .backend import xp_of

SPLIT_FLOPS = 1 << 24  # smaller matmuls (~0.1 ms) are not worth a trip through the threads
BLOCK = 1 << 18  # elements per task of row-wise work: 1 MB of float32, a core's L2 cache


def reuse_freed_memory():
    """Make glibc keep freed memory for the next allocation instead of giving it back.

    A training step allocates and frees the same large arrays every step (activations,
    gradients, the logits). By default glibc maps each large array fresh from the kernel
    and unmaps it when freed, so every step page-faults and zeroes gigabytes: over a
    second of system time in a GPT-2 124M step. Served from the heap, never trimmed, the
    next step reuses the memory the last one freed. The process keeps its peak memory
    until it exits. Done at import; TINYGRAD_LLM_MALLOC=system keeps glibc's defaults.
    Returns whether the allocator was tuned (False off glibc).
    """
    if os.environ.get("TINYGRAD_LLM_MALLOC", "reuse") == "system" or not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
    # M_MMAP_MAX 0: no allocation gets a mapping of its own; M_TRIM_THRESHOLD -1: never trim the heap.
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


reuse_freed_memory()

# ---- threads --------------------------------------------------------------------------------


def _find_openblas():
    """(set_num_threads, get_num_threads) of the OpenBLAS NumPy loaded, or None (MKL, not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return None
    for path in paths:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):  # the ILP64 builds NumPy ships rename their symbols
                setter = getattr(library, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(library, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter
    return None


_openblas = _find_openblas()
_openblas_own_threads = _openblas[1]() if _openblas is not None else None  # its count as NumPy loaded it
_openblas_lock = threading.Lock()  # one split matmul at a time owns OpenBLAS's thread setting


@contextlib.contextmanager
def blas_threads(n):
    """OpenBLAS on n threads for the NumPy calls inside: `with blas_threads(2): a @ b` runs a
    matmul of one's own on OpenBLAS's threads, which sit at one beside ours (see above).
    Nothing changes without OpenBLAS."""
    if _openblas is None:
        yield
        return
    set_threads, get_threads = _openblas
    with _openblas_lock:
        previous = get_threads()
        set_threads(n)
        try:
            yield
        finally:
            set_threads(previous)


THREAD_VARIABLES = ("TINYGRAD_LLM_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def thread_count_from_environment():
    """The first of THREAD_VARIABLES that holds a positive whole number, or None."""
    for name in THREAD_VARIABLES:
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    return None


def available_cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _default_num_threads():
    return thread_count_from_environment() or available_cores()


def _set_blas_threads_between_calls():
    """OpenBLAS on one thread while parallel_map and matmul run the parallel work, on its own
    count in plain NumPy (one thread of ours)."""
    if _openblas is not None:
        _openblas[0](1 if _num_threads > 1 else _openblas_own_threads)


_num_threads = _default_num_threads()
_helpers = None
_set_blas_threads_between_calls()
_local = threading.local()  # .in_pool: this thread is running parallel_map's tasks


class _Helpers:
    """`count` daemon threads, each woken by an Event of its own to run one job.

    An Event round trip costs about 30 us here, against 60-120 us through a
    ThreadPoolExecutor's queue and futures: it is paid on every layer's forward and backward.
    """

    def __init__(self, count):
        self._job = None
        self._wake = [threading.Event() for _ in range(count)]
        self._done = [threading.Event() for _ in range(count)]
        for i in range(count):
            threading.Thread(target=self._serve, args=(i,), name=f"tinygrad_llm-{i}", daemon=True).start()

    def _serve(self, i):
        _local.in_pool = True
        while True:
            self._wake[i].wait()
            self._wake[i].clear()
            if self._job is None:
                return
            self._job()
            self._done[i].set()

    def run(self, job, count):
        """job() on the calling thread and on `count` helpers at once; returns when all are done."""
        self._job = job
        for wake in self._wake[:count]:
            wake.set()
        try:
            job()
        finally:
            for done in self._done[:count]:
                done.wait()
                done.clear()

    def stop(self):
        self._job = None
        for wake in self._wake:
            wake.set()


def get_num_threads():
    return _num_threads


def set_num_threads(n):
    """Threads for `parallel_map` and `matmul` (1: plain NumPy, BLAS with its own threads)."""
    global _num_threads, _helpers
    if int(n) < 1:
        raise ValueError(f"number of threads must be at least 1, got {n}")
    if _helpers is not None:
        _helpers.stop()
    _num_threads, _helpers = int(n), None
    _set_blas_threads_between_calls()


def use_cores(n):
    """Run on n cores: n threads for `parallel_map` and `matmul`, and OpenBLAS's own threads at most
    n too. For several processes on one machine (MPI ranks), each on its share of the cores;
    without it every rank would start a thread per core and they would fight over them."""
    set_num_threads(n)
    if _openblas is not None and int(n) == 1:
        _openblas[0](1)


def _forget_pool():
    global _helpers, _openblas_lock
    # A forked child has none of the parent's threads, nor a lock one of them held.
    _helpers, _openblas_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _in_pool():
    return getattr(_local, "in_pool", False)


def parallel_map(fn, tasks, uses_blas=False):
    """[fn(*task) for task in tasks], the tasks spread over `get_num_threads()` threads.

    The calling thread works too, beside get_num_threads() - 1 helpers, each taking the
    next task until none is left. The tasks must not write to the same memory. BLAS calls
    inside them run single threaded, each task on its core; where BLAS's threads cannot be
    set (not OpenBLAS) tasks that use BLAS run one after the other. From inside a task it
    runs serially.
    """
    global _helpers
    tasks = list(tasks)
    if _num_threads == 1 or len(tasks) < 2 or _in_pool() or (uses_blas and _openblas is None):
        return [fn(*task) for task in tasks]
    if _helpers is None:
        _helpers = _Helpers(_num_threads - 1)
    results, errors, next_task = [None] * len(tasks), [], itertools.count()

    def work():
        # next() on a count is atomic under the GIL: each task is taken exactly once.
        while not errors and (i := next(next_task)) < len(tasks):
            try:
                results[i] = fn(*tasks[i])
            except BaseException as error:  # raised again on the calling thread
                errors.append(error)

    _local.in_pool = True
    try:
        with blas_threads(1):
            _helpers.run(work, min(_num_threads, len(tasks)) - 1)
    finally:
        _local.in_pool = False
    if errors:
        raise errors[0]
    return results


@functools.lru_cache(maxsize=4096)
def pieces(n, count):
    """`count` slices (fewer if n is smaller) of about equal length covering range(n).

    Cached: the same few shapes come back on every layer of every step, and each call
    would otherwise cost a linspace (tens of microseconds beside a decoding step's matmuls).
    """
    count = min(count, n)
    return tuple(slice(i * n // count, (i + 1) * n // count) for i in range(count))


def row_blocks(n_rows, row_size, xp=np):
    """Slices of rows of about BLOCK elements each, so that a task works in a core's cache.

    On a GPU: one block of all rows.
    """
    if xp is not np:
        return [slice(0, n_rows)]
    return pieces(n_rows, max(1, n_rows * row_size // BLOCK))


# ---- matmuls --------------------------------------------------------------------------------


def _matmul_into(a, b, out):
    np.matmul(a, b, out=out)


def _split(a, b, out, count):
    """`count` (a piece, b piece, out piece) triples: the output cut along a batch axis
    (attention's heads) when one has a piece each, else along its longer side."""
    batch = out.shape[:-2]
    same_batch = a.shape[:-2] == b.shape[:-2] == batch
    axis = next((i for i, n in enumerate(batch) if n >= count and same_batch), None)
    if axis is not None:
        index = [(slice(None),) * axis + (piece,) for piece in pieces(batch[axis], count)]
        return [(a[i], b[i], out[i]) for i in index]
    if a.shape[-2] >= b.shape[-1]:
        return [(a[..., rows, :], b, out[..., rows, :]) for rows in pieces(a.shape[-2], count)]
    return [(a, b[..., cols], out[..., cols]) for cols in pieces(b.shape[-1], count)]


def matmuls(pairs):
    """[a @ b for a, b in pairs] for 2-D or stacked arrays, all of them on all the threads.

    With at least as many matmuls as threads each runs whole on one core (a backward
    pass's dx and dW); with fewer each is cut into pieces. Matmuls under SPLIT_FLOPS in
    all run one after the other, each on one core.
    """
    if (_num_threads == 1 or _openblas is None or _in_pool()
            or any(xp_of(a) is not np or a.ndim < 2 or b.ndim < 2 for a, b in pairs)):
        return [a @ b for a, b in pairs]  # BLAS as it is set: all cores in plain NumPy, else one
    shapes = [(*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1]) for a, b in pairs]
    if sum(2 * math.prod(shape) * a.shape[-1] for (a, _), shape in zip(pairs, shapes)) < SPLIT_FLOPS:
        with blas_threads(1):  # one core: a small call does not wait for a busy one
            return [a @ b for a, b in pairs]
    outs = [np.empty(shape, np.result_type(a, b)) for (a, b), shape in zip(pairs, shapes)]
    count = max(1, _num_threads // len(pairs))
    parallel_map(_matmul_into, [task for (a, b), out in zip(pairs, outs) for task in _split(a, b, out, count)],
                 uses_blas=True)
    return outs


def matmul(a, b):
    """a @ b on all the threads (see `matmuls`)."""
    return matmuls([(a, b)])[0]


THIN_BLOCK_ROWS = 512  # rows of a per call in matmul_thin (measured: 256-1024 alike, 1.3x a single call at 50257)


def matmul_thin(a, b):
    """a @ b for a tall a (rows, K) and a b (K, n) of a few columns: a decoding step's W x^T,
    whose cost is reading W.

    This one runs on OpenBLAS's own threads, not on parallel_map's. OpenBLAS's threads spin
    a while between calls, so each of a decoding step's ~50 matmuls starts on both cores at
    once; a thread of ours sleeps, and waking it costs 60-120 us here, as much as a whole
    768 x 768 product. A tall a goes in blocks of THIN_BLOCK_ROWS rows: OpenBLAS reads GPT-2's
    (50257, 768) head 1.3x faster so than in one call, except for one column, whose
    matrix-vector product is fastest whole.
    """
    if xp_of(a) is not np:
        return a @ b
    raise_threads = _openblas is not None and _num_threads > 1 and not _in_pool()
    with blas_threads(_num_threads) if raise_threads else contextlib.nullcontext():
        if a.shape[0] <= THIN_BLOCK_ROWS or b.shape[1] == 1:
            return a @ b
        out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
        for start in range(0, a.shape[0], THIN_BLOCK_ROWS):
            np.matmul(a[start:start + THIN_BLOCK_ROWS], b, out=out[start:start + THIN_BLOCK_ROWS])
        return out
