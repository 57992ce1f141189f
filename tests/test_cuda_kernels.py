"""cuda.py's fused kernels: every one compiles (nvcc, wherever it is installed), and on a GPU
each equals its NumPy twin's arithmetic run as CuPy array code (TINYGRAD_LLM_CUDA_KERNELS=0)
and torch (through the op table, which runs on "cuda" with the kernels on).

Without a GPU the comparisons are skipped; the compile check still catches a kernel that
would not build.
"""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import tinygrad_llm as tl
import tinygrad_llm.functional as F
from tests.conftest import CUDA_IS_STANDIN
from tinygrad_llm import Tensor, backend, cuda
from tinygrad_llm.optim import _adamw_update


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_every_kernel_compiles_with_nvcc(tmp_path):
    # The name expressions CuPy hands NVRTC, taken by address, instantiate every template.
    source = tmp_path / "kernels.cu"
    source.write_text(cuda.SOURCE + "\nvoid* instances[] = {"
                      + ", ".join(f"(void*)&{name}" for name in cuda.NAME_EXPRESSIONS) + "};\n")
    ptx = tmp_path / "kernels.ptx"
    result = subprocess.run(["nvcc", "--ptx", "-std=c++17", "-arch=sm_90", "-Werror", "all-warnings",
                             "-o", str(ptx), str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entries = re.findall(r"\.entry\s+(\w+)", ptx.read_text())
    for name in cuda.NAME_EXPRESSIONS:
        base = name.split("<")[0]
        assert any(base in entry for entry in entries), f"{name} is missing from the PTX"
    assert len(entries) == len(cuda.NAME_EXPRESSIONS)


gpu = pytest.mark.skipif(CUDA_IS_STANDIN, reason="needs CuPy on a GPU (device 'cuda' is the CPU stand-in)")


@pytest.fixture
def kernels(monkeypatch):
    """Run f() with the fused kernels on and off; returns both results on the host."""
    def both(f):
        results = []
        for setting in ("1", "0"):
            monkeypatch.setenv("TINYGRAD_LLM_CUDA_KERNELS", setting)
            results.append(f())
        return results
    return both


def run_op(op, arrays, upstream_seed=0, **options):
    inputs = [Tensor(a, requires_grad=True, device="cuda") for a in arrays]
    out = op(*inputs, **options)
    upstream = np.random.default_rng(upstream_seed).standard_normal(out.shape).astype(out.dtype)
    out.backward(upstream)
    return [out.numpy()] + [backend.to_host(x.grad) for x in inputs]


# float64: kernel and array code sum in different orders: ~1e-13 relative. float32: ~1e-5.
TOLERANCE = {np.float64: 1e-11, np.float32: 2e-5}


def assert_all_close(kernel_results, array_results, dtype):
    for a, b in zip(kernel_results, array_results):
        np.testing.assert_allclose(a, b, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * np.abs(b).max())


@gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gelu_and_layer_norm_kernels_equal_the_array_code(kernels, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 200)).astype(dtype) * 3
    assert_all_close(*kernels(lambda: run_op(F.gelu, [x])), dtype)
    scale, shift = rng.standard_normal(200).astype(dtype), rng.standard_normal(200).astype(dtype)
    assert_all_close(*kernels(lambda: run_op(F.layer_norm, [x, scale, shift])), dtype)


@gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_entropy_kernel_equals_the_array_code_and_torch(kernels, dtype):
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((4, 5, 50257)) * 4).astype(dtype)
    targets = rng.integers(0, 50257, (4, 5))
    targets[0, :2] = -100  # ignored
    t = Tensor(targets, device="cuda")

    def run():
        z = Tensor(logits, requires_grad=True, device="cuda")
        loss = F.cross_entropy(z, t)
        loss.backward()
        return [loss.numpy(), backend.to_host(z.grad)]

    ours, plain = kernels(run)
    assert_all_close(ours, plain, dtype)
    z = torch.tensor(logits, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(z.reshape(-1, 50257), torch.tensor(targets).reshape(-1))
    expected.backward()
    assert_all_close(ours, [expected.detach().numpy(), z.grad.numpy()], dtype)


@gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal, t_query, dropout_p", [(True, 9, 0.0), (True, 1, 0.0), (False, 6, 0.0),
                                                          (True, 9, 0.2)])
def test_attention_kernels_equal_the_array_code(kernels, dtype, causal, t_query, dropout_p):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 3, t_query, 16)).astype(dtype)
    k, v = (rng.standard_normal((2, 3, 9, 16)).astype(dtype) for _ in range(2))

    def run():
        tl.manual_seed(7)  # the same dropout mask on both paths: the kernel computes the same hash
        return run_op(F.scaled_dot_product_attention, [q, k, v], causal=causal, dropout_p=dropout_p)

    assert_all_close(*kernels(run), dtype)


@gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedding_gradient_kernel_sums_repeats_the_same_way_every_run(dtype):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 50, (8, 300))  # every id many times over
    dout = rng.standard_normal((8, 300, 24)).astype(dtype)
    on_gpu = [backend.to_host(cuda.embedding_backward(backend.to_device(dout, "cuda"), backend.to_device(ids, "cuda"),
                                                      (60, 24), dtype)) for _ in range(2)]
    np.testing.assert_array_equal(on_gpu[0], on_gpu[1])  # no atomics: the same bits
    _, expected = F.embedding_backward(dout, (ids, (60, 24), dtype))
    np.testing.assert_allclose(on_gpu[0], expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@gpu
def test_dropout_mask_kernel_computes_the_counter_hash():
    keep = backend.to_host(cuda.dropout_keep_mask((3, 1000), 12345, 2**31))
    np.testing.assert_array_equal(keep, F.counter_hash_bits((3, 1000), 12345) >= 2**31)


@gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adamw_kernel_equals_the_array_code(dtype):
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(10_000).astype(dtype) for _ in range(3)] + [rng.random(10_000).astype(dtype)]
    constants = (1e-3 * 0.1, 0.9, 0.999, 1e-8, 1e-3 / (1 - 0.9**3), np.sqrt(1 - 0.999**3))
    on_gpu = [backend.to_device(a, "cuda") for a in arrays]
    cuda.adamw_update(*on_gpu, *constants)
    _adamw_update(*arrays, *constants)
    for a, b in zip(on_gpu, arrays):
        np.testing.assert_allclose(backend.to_host(a), b, rtol=TOLERANCE[dtype])


@gpu
def test_tf32_matmul_is_close_to_fp32_within_its_own_tolerance(monkeypatch):
    # TF32 keeps 10 of float32's 23 mantissa bits: each product is off by up to 2^-11 ~ 5e-4
    # relative, and a sum of 64 of them by about that relative to the largest term; 5e-3 of
    # the largest result is a safe bound. Without TF32 the same product is exact to ~1e-6.
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 3, 50, 64)), rng.standard_normal((2, 3, 64, 40))
    exact = a @ b
    a32, b32 = (backend.to_device(x.astype(np.float32), "cuda") for x in (a, b))
    strict = backend.to_host(cuda.matmul(a32, b32))
    monkeypatch.setenv("TINYGRAD_LLM_TF32", "1")
    tf32 = backend.to_host(cuda.matmul(a32, b32))
    scale = np.abs(exact).max()
    assert np.abs(strict - exact).max() < 1e-5 * scale
    assert np.abs(tf32 - exact).max() < 5e-3 * scale
    assert not np.array_equal(tf32, strict)  # TF32 did round the inputs


def test_only_backend_and_cuda_import_cupy():
    package = os.path.dirname(tl.__file__)
    importing = sorted(os.path.relpath(os.path.join(folder, name), package)
                       for folder, _, names in os.walk(package) for name in names if name.endswith(".py")
                       and re.search(r"^\s*(import cupy|from cupy)", open(os.path.join(folder, name)).read(), re.M))
    assert importing == ["backend.py", "cuda.py"]


def test_the_kernels_are_off_on_the_cpu_and_on_the_standin(monkeypatch):
    assert not cuda.kernels_on("cpu")
    monkeypatch.setenv("TINYGRAD_LLM_CUDA_KERNELS", "0")
    assert not cuda.kernels_on("cuda")
    if CUDA_IS_STANDIN:
        monkeypatch.delenv("TINYGRAD_LLM_CUDA_KERNELS")
        assert not cuda.kernels_on("cuda")
    assert os.environ.get("CUPY_TF32") is None  # the tests never turn TF32 on for everyone
