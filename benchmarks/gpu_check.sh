#!/usr/bin/env bash
# The GPU check: the whole test suite with device "cuda" on CuPy, then benchmarks/devices.py,
# and on a machine of 2 or more GPUs with mpi4py and mpiexec, benchmarks/distributed.py on the
# GPUs (data parallel over NCCL, one rank per GPU; skipped on one GPU).
#
# For one CUDA GPU (sized for an H100/H200: under 8 minutes) with python3, NumPy, CuPy,
# torch built with CUDA, pytest and hypothesis installed. Nothing is downloaded. The
# library's own pure dependencies (safetensors, tqdm, regex, tiktoken) must be importable;
# where they are not, wheels for that machine's Python placed in .gpu-wheels/ are installed
# from there (pip --no-index) into .gpu-site/, which goes on PYTHONPATH.
#
# (Wheels for another machine: pip download --only-binary=:all: --python-version 3.X -d .gpu-wheels
# safetensors tqdm regex tiktoken.)
#
# CuPy compiles each kernel on first use (NVRTC) and keeps it in CUPY_CACHE_DIR
# (default .cupy-cache/ here): carry that folder to the next run to skip the compiling.
# The data files the registry needs come from TINYGRAD_LLM_DATA (default ../shared/data).
#
# The phases are capped so that the whole run ends within 8 minutes (TESTS_LIMIT, then what is
# left of TOTAL_LIMIT for the benchmarks, of which DISTRIBUTED_LIMIT for the NCCL one where it
# runs, in seconds); the benchmarks print each row as it is measured, so a cut-off run still
# shows the rows it finished.
#
#     bash benchmarks/gpu_check.sh              # from anywhere; runs in the repository root
#     bash benchmarks/gpu_check.sh --quick      # the suite, then a tiny-config benchmark
#     bash benchmarks/gpu_check.sh --steps 3    # any other options go to devices.py
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
export CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-$PWD/.cupy-cache}"
export TINYGRAD_LLM_DATA="${TINYGRAD_LLM_DATA:-$(cd .. && pwd)/shared/data}"
PYTHON="${PYTHON:-python3}"
TESTS_LIMIT="${TESTS_LIMIT:-300}"
TOTAL_LIMIT="${TOTAL_LIMIT:-470}"
started=$SECONDS
gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
distributed_limit=0
if [ "$gpus" -ge 2 ] && "$PYTHON" -c "import mpi4py" 2>/dev/null; then
    distributed_limit="${DISTRIBUTED_LIMIT:-90}"
fi

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
"$PYTHON" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("numpy", "cupy", "torch", "pytest", "hypothesis", "safetensors", "tqdm", "regex", "tiktoken"):
    try:
        module = importlib.import_module(name)
        print(f"{name:12s} {getattr(module, '__version__', '?')}")
    except ImportError:
        print(f"{name:12s} MISSING")
import torch
print("torch CUDA:", torch.cuda.is_available(), torch.version.cuda)
PY

missing=$("$PYTHON" -c "import importlib.util as u; print(' '.join(n for n in ('safetensors', 'tqdm', 'regex', 'tiktoken') if u.find_spec(n) is None))")
if [ -n "$missing" ]; then
    if [ -d .gpu-wheels ]; then
        echo "== installing $missing from .gpu-wheels/ into .gpu-site/"
        "$PYTHON" -m pip install --quiet --no-index --find-links .gpu-wheels --target .gpu-site $missing || exit 1
    else
        echo "missing packages: $missing (put wheels for this Python in .gpu-wheels/)"
        exit 1
    fi
fi

echo "== the test suite, device 'cuda' = CuPy on the GPU"
# TINYGRAD_LLM_TEST_CUDA=cupy: an error instead of the CPU stand-in when CuPy finds no GPU.
TINYGRAD_LLM_TEST_CUDA=cupy CI=true timeout "$TESTS_LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/
tests_status=$?
echo "== tests: exit status $tests_status after $((SECONDS - started)) s"

echo "== benchmarks/devices.py"
left=$((TOTAL_LIMIT - (SECONDS - started) - distributed_limit))
[ "$left" -ge 30 ] || left=30  # (timeout 0 would mean no limit at all)
timeout "$left" "$PYTHON" benchmarks/devices.py "$@"
bench_status=$?

if [ "$distributed_limit" -gt 0 ]; then
    echo "== benchmarks/distributed.py --device cuda: 1 and 2 ranks, NCCL ($gpus GPUs)"
    timeout "$distributed_limit" "$PYTHON" benchmarks/distributed.py --device cuda --configs tiny 124M --ranks 1 2
    [ $? -eq 0 ] || bench_status=1
else
    echo "== benchmarks/distributed.py --device cuda: skipped ($gpus GPU(s); NCCL needs 2, and mpi4py)"
fi
echo "== done in $((SECONDS - started)) s (tests: $tests_status, benchmarks: $bench_status)"
exit $(( tests_status != 0 || bench_status != 0 ))
