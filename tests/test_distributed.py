"""Data parallel training over MPI: mpiexec -n 2 against one process with the global batch.

Needs the [distributed] extra (mpi4py and MPICH's mpiexec); skipped without it. The GPU path
(NCCL) runs on device "cuda" as the test suite's CPU stand-in for CuPy, in every rank, on any
machine: the stand-in's NCCL all-reduce goes through MPI.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tinygrad_llm as tl
from tinygrad_llm import backend, distributed
from tinygrad_llm.checkpoint import read_checkpoint
from tinygrad_llm.data import DataLoader

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
if MPIEXEC is None:
    pytest.skip("no mpiexec (pip install 'tinygrad_llm[distributed]')", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "distributed_run.py"
TINY = {"vocab_size": 50257, "context_length": 16, "emb_dim": 16, "n_heads": 2, "n_layers": 1,
        "drop_rate": 0.0, "qkv_bias": False}


def run(ranks, *args, cwd, timeout=300):
    command = [sys.executable, *map(str, args)]
    if ranks > 1:
        command = [MPIEXEC, "-n", str(ranks), *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def trained(ranks, tmp_path, name, *options):
    """(losses, evaluation records, final weights, everything rank 0 wrote)."""
    result = run(ranks, RUN, tmp_path / name, *options, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / name).read_text())
    return out["losses"], out["history"], {key: np.array(value) for key, value in out["weights"].items()}, out


def assert_same_run(a, b, loss_rtol, weight_atol):
    np.testing.assert_allclose(a[0], b[0], rtol=loss_rtol, atol=0)  # the loss of every step's global batch
    np.testing.assert_allclose([r["train_loss"] for r in a[1]], [r["train_loss"] for r in b[1]], rtol=loss_rtol,
                               atol=0)
    assert [r["tokens_seen"] for r in a[1]] == [r["tokens_seen"] for r in b[1]]
    for name, weight in a[2].items():
        np.testing.assert_allclose(b[2][name], weight, rtol=0, atol=weight_atol, err_msg=name)


# The all-reduce sums the ranks' gradients in another order than one process's matmuls do,
# so the runs agree to rounding, which AdamW's division by sqrt(v) carries into the weights.
# Measured after 6 steps: float64 losses equal, weights within 5.5e-15; float32 losses
# within 4.3e-8 (relative), weights within 1.4e-6 (weights of order 0.1-1).
@pytest.mark.parametrize("dtype, loss_rtol, weight_atol", [("float64", 1e-12, 1e-12), ("float32", 1e-6, 1e-5)])
def test_two_ranks_with_batch_b_train_as_one_process_with_batch_2b(tmp_path, dtype, loss_rtol, weight_atol):
    one = trained(1, tmp_path, "one.json", "--batch", 4, "--steps", 6, "--dtype", dtype)
    two = trained(2, tmp_path, "two.json", "--batch", 2, "--steps", 6, "--dtype", dtype)
    assert len(one[0]) == 6
    assert_same_run(one, two, loss_rtol, weight_atol)


def test_a_checkpoint_and_resume_under_two_ranks_continue_bit_for_bit(tmp_path):
    # With dropout: each rank's own generator is saved and restored.
    options = ["--batch", 2, "--steps", 6, "--dropout", 0.2]
    whole = trained(2, tmp_path, "whole.json", *options, "--checkpoint", tmp_path / "whole.safetensors")
    trained(2, tmp_path, "first.json", *options, "--checkpoint", tmp_path / "halves.safetensors", "--stop-at", 3)
    second = trained(2, tmp_path, "second.json", *options, "--checkpoint", tmp_path / "halves.safetensors",
                     "--resume")
    assert second[0] == whole[0][3:]
    for name, weight in whole[2].items():
        np.testing.assert_array_equal(second[2][name], weight)


RANK_THREADS = """
from tinygrad_llm import cpu, distributed
world = distributed.current()
world.select_device("cpu")
print(f"rank {world.rank}: {cpu.get_num_threads()} threads")
"""


@pytest.mark.parametrize("variables, threads", [({}, max(1, os.cpu_count() // 2)),
                                                ({"TINYGRAD_LLM_NUM_THREADS": "3"}, 3)])
def test_ranks_on_one_machine_share_its_cores_unless_told_otherwise(tmp_path, variables, threads):
    # Each rank would otherwise start a thread per core, and two ranks would fight over them.
    env = {key: value for key, value in os.environ.items() if key not in distributed.cpu.THREAD_VARIABLES}
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", RANK_THREADS], capture_output=True, text=True,
                            env={**env, **variables, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    # The ranks' lines reach mpiexec's output in either order, and may interleave.
    assert sorted(re.findall(r"rank (\d): (\d+) threads", result.stdout)) == [(str(r), str(threads)) for r in range(2)]


def test_a_killed_rank_ends_the_job_within_seconds_and_the_checkpoint_loads(tmp_path):
    started = time.monotonic()
    result = run(2, RUN, tmp_path / "out.json", "--batch", 2, "--steps", 6, "--checkpoint",
                 tmp_path / "ckpt.safetensors", "--kill-rank", 1, "--kill-at-step", 3, cwd=tmp_path, timeout=120)
    assert time.monotonic() - started < 60
    assert result.returncode != 0
    assert re.search(r"rank 1 of 2 \(process id \d+\) was killed by SIGKILL", result.stderr), result.stderr
    metadata = tl.load_checkpoint(tmp_path / "ckpt.safetensors", tl.GPTModel(
        {"vocab_size": 50257, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
         "qkv_bias": False}))
    assert metadata["train_state"]["step"] == 2  # saved every 2 steps; the kill came in step 3


WAITS_FOR_A_GONE_RANK = """
import subprocess, sys, time
from tinygrad_llm.distributed import World

peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

class OneCollectiveComm:
    # rank 0 of 2, its peer the process above; the first gather (two allgathers: the process
    # ids, then its own) ends, every later one never does
    calls = 0
    def Get_rank(self): return 0
    def Get_size(self): return 2
    def allgather(self, mine):
        OneCollectiveComm.calls += 1
        if OneCollectiveComm.calls > 2:
            time.sleep(60)
        return [mine, (mine[0], peer.pid)]

world = World(OneCollectiveComm())
world.gather("hello")  # the first collective: the peers' process ids
peer.kill(); peer.wait()
time.sleep(1.5)  # outside a collective a gone peer ends nothing (it may have finished)
print("still running", flush=True)
world.gather("hello")
print("the collective returned", flush=True)
"""


def test_a_rank_waiting_for_a_gone_rank_of_its_machine_ends_itself():
    # The fallback for when mpiexec does not end the job after a rank dies: the rank left
    # waiting in a collective would otherwise spin there forever.
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", WAITS_FOR_A_GONE_RANK], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    assert result.stdout == "still running\n"
    assert re.search(r"rank 0 of 2: the rank in process \d+ on this machine is gone while this one waits", result.stderr)


def test_a_rank_that_raises_ends_every_rank_naming_itself(tmp_path):
    started = time.monotonic()
    result = run(2, RUN, tmp_path / "out.json", "--batch", 2, "--steps", 6, "--raise-rank", 1, cwd=tmp_path,
                 timeout=120)
    assert time.monotonic() - started < 60
    assert result.returncode != 0
    assert "rank 1 of 2: ValueError: made to fail; ending every rank" in result.stderr


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    result = run(2, RUN, tmp_path / "out.json", "--batch", 2, "--steps", 6, "--checkpoint",
                 tmp_path / "ckpt.safetensors", "--term-rank", 1, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["interrupted"] == "training interrupted by SIGTERM after step 2" and len(out["losses"]) == 3
    assert read_checkpoint(tmp_path / "ckpt.safetensors")["metadata"]["train_state"]["step"] == 3


# ---- on GPUs: NCCL, with device "cuda" the CPU stand-in for CuPy in every rank ----------------

ON_STANDIN_GPUS = ["--device", "cuda", "--cuda-standin"]  # a machine of 2 stand-in GPUs


@pytest.mark.parametrize("dtype, loss_rtol, weight_atol", [("float64", 1e-12, 1e-12), ("float32", 1e-6, 1e-5)])
def test_two_ranks_on_gpus_average_the_gradients_with_one_nccl_allreduce_per_step(tmp_path, dtype, loss_rtol,
                                                                                   weight_atol):
    one = trained(1, tmp_path, "one.json", "--batch", 4, "--steps", 6, "--dtype", dtype, *ON_STANDIN_GPUS)
    two = trained(2, tmp_path, "two.json", "--batch", 2, "--steps", 6, "--dtype", dtype, *ON_STANDIN_GPUS)
    assert_same_run(one, two, loss_rtol, weight_atol)  # the tolerances of the MPI test above, for the same reason
    (alone,), ranks = one[3]["standin_by_rank"], two[3]["standin_by_rank"]
    assert [rank["gpu"] for rank in ranks] == [0, 1]  # one GPU per rank
    for rank in ranks:
        # One all-reduce per step, over every gradient in one flat buffer ...
        assert rank["nccl_allreduces"] == [two[3]["parameters"]] * 6
        # ... on the device: each rank copies to and from the host exactly as one process does.
        assert rank["transfers"] == alone["transfers"]


def test_on_gpus_without_nccl_the_gradients_go_through_the_host_and_mpi(tmp_path):
    one = trained(1, tmp_path, "one.json", "--batch", 4, "--steps", 6, *ON_STANDIN_GPUS)
    two = trained(2, tmp_path, "two.json", "--batch", 2, "--steps", 6, *ON_STANDIN_GPUS, "--no-nccl")
    assert_same_run(one, two, 1e-6, 1e-5)  # float32, as above
    (alone,), ranks = one[3]["standin_by_rank"], two[3]["standin_by_rank"]
    for rank in ranks:
        assert rank["nccl_allreduces"] == []
        extra = {direction: count - alone["transfers"][direction] for direction, count in rank["transfers"].items()}
        assert extra == {"to_host": 6 * two[3]["gradients"], "to_device": 6 * two[3]["gradients"]}  # each, each step


def cli(ranks, *args, cwd):
    return run(ranks, "-m", "tinygrad_llm", *args, cwd=cwd)


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    from tinygrad_llm.shards import prepare

    folder = tmp_path_factory.mktemp("distributed")
    text = tl.datasets.path("the-verdict").read_text(encoding="utf-8")
    (folder / "corpus").mkdir()
    for i in range(4):
        (folder / "corpus" / f"part{i}.txt").write_text(text[i * 2000:(i + 1) * 2000], encoding="utf-8")
    prepare(folder / "corpus", folder / "shards", shard_tokens=500, processes=1, progress=False)
    (folder / "tiny.json").write_text(json.dumps(TINY))
    return folder


def test_pretrain_under_mpiexec_matches_one_process_and_resumes_only_with_as_many_ranks(shard_folder, tmp_path):
    common = ["pretrain", "--data", shard_folder / "shards", "--config", shard_folder / "tiny.json", "--epochs", 2,
              "--eval-freq", 4, "--eval-iter", 2, "--no-progress"]
    one = cli(1, *common, "--batch-size", 4, "--out", tmp_path / "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = cli(2, *common, "--batch-size", 2, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert "on each of 2 ranks" in two.stdout and "Process ids by rank: 0: " in two.stdout
    assert two.stdout.count("Checkpoint:") == 1  # rank 0 alone prints

    def final(out):
        model = tl.GPTModel(TINY)
        metadata = tl.load_checkpoint(tmp_path / out / "checkpoint.safetensors", model)
        return model.state_dict(), [r["val_loss"] for r in metadata["train_state"]["history"] if "val_loss" in r]

    (weights_one, losses_one), (weights_two, losses_two) = final("one"), final("two")
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)
    for name, weight in weights_one.items():
        np.testing.assert_allclose(weights_two[name], weight, rtol=1e-5, atol=1e-6, err_msg=name)
    metrics = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == len(losses_two)  # one writer

    again = cli(1, "pretrain", "--out", tmp_path / "two", "--resume", "--data", shard_folder / "shards", "--epochs", 2,
                "--no-progress", cwd=tmp_path)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert "written by a run on 2 rank(s) (global batch 4); resume it with mpiexec -n 2, not 1" in again.stderr


# `python -c STANDIN_CLI GPUS ARGS...`: tinygrad-llm ARGS with device "cuda" the stand-in on a
# machine of GPUS GPUs; prints how many NCCL all-reduces the rank made.
STANDIN_CLI = ("import sys; from tests import cupy_standin; from tinygrad_llm import backend; "
               "from tinygrad_llm.cli import main; backend.use_cuda_module(cupy_standin); "
               "cupy_standin.gpu_count = int(sys.argv.pop(1)); code = main(sys.argv[1:]); "
               "print(f'NCCL all-reduces: {len(cupy_standin.allreduces)}', file=sys.stderr); sys.exit(code)")


def test_pretrain_under_mpiexec_on_gpus_gives_each_rank_its_gpu_and_all_reduces_with_nccl(shard_folder, tmp_path):
    common = ["pretrain", "--data", shard_folder / "shards", "--config", shard_folder / "tiny.json", "--epochs", 1,
              "--batch-size", 2, "--device", "cuda", "--no-progress"]
    two = run(2, "-c", STANDIN_CLI, 2, *common, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    steps = read_checkpoint(tmp_path / "two" / "checkpoint.safetensors")["metadata"]["train_state"]["step"]
    assert re.findall(r"NCCL all-reduces: (\d+)", two.stderr) == [str(steps)] * 2 and steps > 0

    crowded = run(2, "-c", STANDIN_CLI, 1, *common, "--out", tmp_path / "crowded", cwd=tmp_path)
    assert crowded.returncode != 0 and "Traceback" not in crowded.stderr
    assert "mpiexec started 2 ranks on this machine, which has 1 GPU(s): start at most 1 per machine" in crowded.stderr


# ---- in one process ------------------------------------------------------------------------


def test_one_process_is_rank_0_of_1_without_mpi(monkeypatch):
    for name in distributed.RANK_COUNT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_ranks() == 1
    world = distributed.World()
    assert (world.rank, world.size) == (0, 1)
    assert world.average({"loss": 2.5}) == {"loss": 2.5} and world.agree(15) == 15


def test_the_standins_nccl_takes_cupys_arguments_and_refuses_what_nccl_would_misread(standin_cuda):
    from tests import cupy_standin

    nccl = backend.nccl()  # found as CuPy's is: <module>.cuda.nccl
    assert nccl.NCCL_SUM == 0 and (nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64) == (7, 8)  # NCCL's ncclRedOp_t, ncclDataType_t
    communicator = nccl.NcclCommunicator(1, nccl.get_unique_id(), 0)  # this process alone
    flat = cupy_standin.arange(6, dtype=np.float32)
    stream = backend.current_stream()
    communicator.allReduce(flat.data.ptr, flat.data.ptr, 4, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)
    assert cupy_standin.allreduces[-1] == 4 and not standin_cuda  # a sum over one rank; no copy to or from the host
    np.testing.assert_array_equal(flat.get(), np.arange(6))
    with pytest.raises(TypeError):  # a MemoryPointer is not an intptr_t
        communicator.allReduce(flat.data, flat.data.ptr, 6, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)
    with pytest.raises(nccl.NcclError, match="datatype 8 for sendbuf, an array of float32"):
        communicator.allReduce(flat.data.ptr, flat.data.ptr, 6, nccl.NCCL_FLOAT64, nccl.NCCL_SUM, stream.ptr)
    with pytest.raises(nccl.NcclError, match="fewer than 7 elements"):
        communicator.allReduce(flat.data.ptr, flat.data.ptr, 7, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, stream.ptr)
    with pytest.raises(TypeError, match="expected tuple, got list"):
        nccl.NcclCommunicator(1, list(nccl.get_unique_id()), 0)
    cupy_standin.cuda.nccl.available = False  # a CuPy whose NCCL library did not load
    try:
        assert backend.nccl() is None
    finally:
        cupy_standin.cuda.nccl.available = True


def test_rank_batches_split_each_global_batch_in_row_order():
    class Dataset:
        def __len__(self):
            return 12

        def batch(self, indices):
            return np.asarray(indices)[:, None] * np.ones((1, 3), int), np.asarray(indices)[:, None]

    class Rank:
        def __init__(self, rank):
            self.rank, self.size = rank, 3

    loader = DataLoader(Dataset(), 6, shuffle=True, drop_last=True, seed=1)
    whole = [targets[:, 0].tolist() for _, targets in DataLoader(Dataset(), 6, shuffle=True, drop_last=True, seed=1)]
    parts = [[targets[:, 0].tolist() for _, targets in distributed.RankBatches(
        DataLoader(Dataset(), 6, shuffle=True, drop_last=True, seed=1), Rank(r))] for r in range(3)]
    assert [sum((parts[r][b] for r in range(3)), []) for b in range(2)] == whole
    assert distributed.RankBatches(loader, Rank(0)).rng is loader.rng
    with pytest.raises(ValueError, match="global batch of 6 rows cannot be split over 4 ranks"):
        distributed.RankBatches(loader, type("Four", (), {"rank": 0, "size": 4})())
