"""Data parallelism over MPI (mpi4py): one process per rank, one all-reduce of the gradients per step.

    mpiexec -n N tinygrad-llm pretrain ... --batch-size B [--device cuda]

Every rank builds the same model from the same seed and draws the same global batches of
N*B rows (from a seeded loader); rank r trains on rows [rB, (r+1)B) of each (RankBatches).
After backward, `World.allreduce_gradients` sums every gradient over the ranks in one
all-reduce over one flat buffer and divides by N: with a loss that is a mean over
rows of equal weight (pretraining's cross-entropy), that is the gradient of the global
batch, so every rank takes the same optimizer step and the weights stay identical.

Rank 0 alone writes checkpoints, the metrics log and the progress bar. Each rank draws
its own dropout masks, from a generator seeded with (seed, rank). A rank that raises
ends every rank naming itself (`World.ending_together`); one killed by a signal is named
by its supervisor process (`supervise_rank`). mpiexec ends the others then; should it not, a
rank waiting in a collective for a rank of its machine that is gone ends itself
(`World.collective`), so no rank spins in an all-reduce that cannot finish.

On the CPU the buffer is a host array and the all-reduce MPI's Allreduce. On GPUs there is
one rank per GPU (`World.select_device`, before the model moves there, takes the GPU numbered
by the rank's place on its machine), and where CuPy has NCCL (`backend.nccl`) the buffer
stays on the GPU: one NCCL all-reduce on CuPy's current stream, through one communicator
made at the first step (rank 0 draws its unique id, MPI broadcasts it). Without NCCL the
gradients go through the host and MPI. The NCCL path is tested on the CPU only, under
mpiexec against the test suite's CuPy stand-in (tests/cupy_standin.py); it has not run on
a GPU.

The ranks are found from the environment mpiexec sets (MPICH's PMI_SIZE, Open MPI's
OMPI_COMM_WORLD_SIZE); a process started without mpiexec is rank 0 of 1 and never
imports mpi4py. mpi4py comes with `pip install 'tinygrad_llm[distributed]'`, which also
installs MPICH's mpiexec.
"""
import contextlib
import ctypes
import functools
import os
import signal
import socket
import sys
import threading
import time

import numpy as np

from . import backend, cpu

RANK_COUNT_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
SUPERVISED = "TINYGRAD_LLM_SUPERVISED"  # set in a rank's worker process: it is supervised already
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
PEER_CHECK_SECONDS = 0.5  # how often a rank waiting in a collective looks for its machine's other ranks


class World:
    """This process's rank among `size`, and the collective operations the training loop uses."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = 0 if comm is None else comm.Get_rank()
        self.size = 1 if comm is None else comm.Get_size()
        self.communication_seconds = 0.0  # time spent in all-reduces, for the scaling figures
        self.nccl_communicator = None  # made at the first all-reduce of gradients on the GPU
        self._peers = None  # process ids of the other ranks on this machine, from the first collective
        self._waiting = False  # in a collective now

    @contextlib.contextmanager
    def collective(self):
        """Wait in a collective operation while a thread watches this machine's other ranks.

        A rank that is gone (killed, or ended) can never join: this one would wait forever,
        at full speed, since MPI's waits spin. mpiexec ends the job when a rank dies, and the
        thread is for when it does not: it ends this process, whose supervisor passes the
        exit on. The first collective of a job tells every rank the others' process ids (all
        ranks make the same collective calls, in the same order).
        """
        if self._peers is None:
            host = socket.gethostname()
            self._peers = [pid for peer_host, pid in self.comm.allgather((host, os.getpid()))
                           if peer_host == host and pid != os.getpid()]
            if self._peers:
                threading.Thread(target=self._watch_peers, name="tinygrad_llm-peers", daemon=True).start()
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def _watch_peers(self):
        while True:
            time.sleep(PEER_CHECK_SECONDS)
            gone = [pid for pid in self._peers if not _process_alive(pid)]
            if self._waiting and gone:
                print(f"rank {self.rank} of {self.size}: the rank in process {gone[0]} on this machine is gone "
                      "while this one waits for it in a collective; ending", file=sys.stderr, flush=True)
                os._exit(1)

    def select_device(self, device):
        """Give this rank its part of its machine, before the model is moved to `device`.

        On "cuda": its own GPU, numbered by the rank's place among the ranks on its machine
        (one rank per GPU, which NCCL requires). On the CPU: its share of the cores, the
        machine's cores divided by the ranks on it (cpu.use_cores), unless a thread count was
        set in the environment (TINYGRAD_LLM_NUM_THREADS, OPENBLAS_NUM_THREADS,
        OMP_NUM_THREADS). Nothing to do alone.
        """
        if self.size == 1:
            return
        from mpi4py import MPI

        machine = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)  # the ranks sharing this machine
        local_rank, local_size = machine.Get_rank(), machine.Get_size()
        machine.Free()
        if backend.check_device(device) != "cuda":
            if cpu.thread_count_from_environment() is None:
                cpu.use_cores(max(1, cpu.available_cores() // local_size))
            return
        gpus = backend.gpu_count()
        if local_size > gpus:
            raise ValueError(f"mpiexec started {local_size} ranks on this machine, which has {gpus} GPU(s): "
                             f"start at most {gpus} per machine, one rank per GPU")
        backend.use_gpu(local_rank)

    def allreduce_gradients(self, params):
        """Average the gradients of `params` over the ranks, in place: one all-reduce over one flat buffer.

        On the GPU with NCCL the buffer stays on the device (NCCL's all-reduce); elsewhere it
        is a host buffer and MPI's Allreduce. Parameters without a gradient (frozen) are
        skipped; every rank holds the same model, so every rank skips the same ones and the
        buffers line up.
        """
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if backend.device_of(grads[0]) == "cuda" and backend.nccl() is not None:
            self._allreduce_with_nccl(grads)
        else:
            self._allreduce_with_mpi(grads)

    def _allreduce_with_mpi(self, grads):
        from mpi4py import MPI

        flat = np.concatenate([backend.to_host(g).ravel() for g in grads])  # (total parameters,)
        start = time.perf_counter()
        with self.collective():
            self.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        self.communication_seconds += time.perf_counter() - start
        flat /= self.size
        offset = 0
        for g in grads:
            g[...] = backend.to_device(flat[offset:offset + g.size].reshape(g.shape), backend.device_of(g))
            offset += g.size

    def _allreduce_with_nccl(self, grads):
        nccl = backend.nccl()
        if self.nccl_communicator is None:
            # Collective: every rank comes here at its first step. Rank 0's id names the
            # communicator; MPI carries it to the others. The current GPU is the rank's own.
            with self.collective():
                unique_id = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
            self.nccl_communicator = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        flat = backend.xp_of(grads[0]).concatenate([g.ravel() for g in grads])  # (total parameters,), on the GPU
        datatype = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}[flat.dtype]
        stream = backend.current_stream()
        stream.synchronize()  # the backward pass's kernels finish outside the clock
        start = time.perf_counter()
        with self.collective():
            self.nccl_communicator.allReduce(flat.data.ptr, flat.data.ptr, flat.size, datatype, nccl.NCCL_SUM,
                                             stream.ptr)
            stream.synchronize()  # NCCL returns once the all-reduce is queued; the clock stops when it is done
        self.communication_seconds += time.perf_counter() - start
        flat /= self.size
        offset = 0
        for g in grads:
            g[...] = flat[offset:offset + g.size].reshape(g.shape)
            offset += g.size

    def average(self, values):
        """A dict of floats averaged over the ranks (each rank's evaluation of its own rows)."""
        if self.size == 1:
            return values
        from mpi4py import MPI

        keys = sorted(values)
        total = np.array([float(values[key]) for key in keys])
        with self.collective():
            self.comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
        return {**values, **{key: float(value) / self.size for key, value in zip(keys, total)}}

    def agree(self, flag):
        """The largest of every rank's `flag` (a signal number, 0 for none): all ranks stop together."""
        if self.size == 1:
            return flag
        with self.collective():
            return self.comm.allreduce(flag, op=_max())

    def gather(self, value):
        """Every rank's `value` (a JSON-able object), in rank order, on every rank."""
        if self.size == 1:
            return [value]
        with self.collective():
            return self.comm.allgather(value)

    @contextlib.contextmanager
    def ending_together(self):
        """An exception on this rank ends every rank (abort), naming this rank: the others would
        otherwise wait for it in the next all-reduce forever. Ctrl-C and SIGTERM are not ended
        here: the training loop has every rank stop after the same step."""
        try:
            yield
        except Exception as error:
            self.abort(f"{type(error).__name__}: {error}")
            raise

    def abort(self, message):
        """End every rank at once (a rank that raised would leave the others waiting in an all-reduce).
        Nothing to do in a process of its own, which ends as usual."""
        if self.size > 1:
            print(f"rank {self.rank} of {self.size}: {message}; ending every rank", file=sys.stderr, flush=True)
            self.comm.Abort(1)


def _process_alive(pid):
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _max():
    from mpi4py import MPI

    return MPI.MAX


def launched_ranks():
    """The rank count mpiexec announced in the environment (1 when started without it)."""
    for name in RANK_COUNT_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def launched_rank():
    """This process's rank as mpiexec announced it in the environment (0 when started without it)."""
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def supervise_rank():
    """Under mpiexec with several ranks: go on in a child process, and stay as its supervisor.

    A rank killed without a word (SIGKILL, the kernel's out-of-memory killer) cannot say
    who it was, and mpiexec names only the process id of what it started. So the process
    mpiexec started forks: the child returns from this call and runs the rank; the parent
    forwards the signals a job gets (Ctrl-C, SIGTERM) to it, waits, and when the child is
    killed by a signal prints which rank died and exits as it did, which makes mpiexec end
    every rank. The child dies with its parent (PR_SET_PDEATHSIG), so killing a
    supervisor leaves no rank behind. Call it first, before MPI starts; it returns at once
    in a process of its own, off Linux, or in a rank already supervised.
    """
    if launched_ranks() == 1 or os.environ.get(SUPERVISED) or not sys.platform.startswith("linux"):
        return
    os.environ[SUPERVISED] = "1"
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)
        os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor alone, which passes it on once
        return
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda signum, frame: os.kill(child, signum))
    _, status = os.waitpid(child, 0)  # retried after each forwarded signal (PEP 475)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) not in FORWARDED_SIGNALS:
        name = signal.Signals(os.WTERMSIG(status)).name
        print(f"rank {launched_rank()} of {launched_ranks()} (process id {child}) was killed by {name}"
              f"{' (the out-of-memory killer sends it too)' if name == 'SIGKILL' else ''}; ending every rank",
              file=sys.stderr, flush=True)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


@functools.cache
def current():
    """This process's World: from MPI when mpiexec started several ranks, else rank 0 of 1."""
    if launched_ranks() == 1:
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError(f"mpiexec started {launched_ranks()} ranks but mpi4py is not installed: "
                           "pip install 'tinygrad_llm[distributed]'") from None
    return World(MPI.COMM_WORLD)


def rank_seed(seed, rank):
    """A seed for rank `rank`'s dropout masks: different on every rank, the same on every run."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


class RankBatches:
    """Rows [rB, (r+1)B) of each batch of `loader`, which draws global batches of N*B rows.

    Every rank iterates the same loader with the same seed, so all draw the same global
    batches; `rng` is the loader's own, so the training loop saves and restores it.
    """

    def __init__(self, loader, world):
        if loader.batch_size % world.size:
            raise ValueError(f"the global batch of {loader.batch_size} rows cannot be split over {world.size} ranks")
        if not loader.drop_last and len(loader.dataset) % loader.batch_size:
            raise ValueError("every global batch must be full to split it over the ranks: use drop_last=True")
        self.loader, self.world = loader, world
        self.rows = loader.batch_size // world.size

    @property
    def rng(self):
        return self.loader.rng

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        mine = slice(self.world.rank * self.rows, (self.world.rank + 1) * self.rows)
        for inputs, targets in self.loader:
            yield inputs[mine], targets[mine]
