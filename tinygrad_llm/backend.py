"""The one place that knows about NumPy and CuPy.

Arrays live on a device: "cpu" means NumPy, "cuda" means CuPy. The default device comes
from the environment variable TINYGRAD_LLM_DEVICE (default "cpu"); CuPy is imported only
when a "cuda" array is first asked for, so the library imports cleanly without it.
This module also holds the default float dtype and the seedable random generator that
initialisation, dropout and sampling draw from (`manual_seed`).
"""
import importlib
import os

import numpy as np

DEVICES = ("cpu", "cuda")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_default_dtype = np.dtype(np.float32)
_generator = np.random.default_rng()


_cuda_module = None  # CuPy once imported and checked, or the module given to use_cuda_module


def _cupy():
    global _cuda_module
    if _cuda_module is None:
        if os.environ.get("TINYGRAD_LLM_TF32") == "1":
            # The TF32 option: CuPy reads CUPY_TF32 at its first float32 2-D matmul (cuda.py
            # passes TF32 to cuBLAS for the batched ones, where CuPy ignores it).
            os.environ.setdefault("CUPY_TF32", "1")
        try:
            import cupy
        except ImportError as error:
            raise RuntimeError(
                "device 'cuda' needs CuPy, which is not installed: pip install 'tinygrad_llm[gpu]' "
                "(a cupy-cuda12x or cupy-cuda13x wheel matching the CUDA driver), or use device 'cpu'"
            ) from error
        try:
            gpus = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # CUDARuntimeError: no driver, or a driver too old for this CuPy
            raise RuntimeError(f"device 'cuda' needs a CUDA GPU, and CuPy finds none ({error}); "
                               "use device 'cpu'") from error
        if gpus == 0:
            raise RuntimeError("device 'cuda' needs a CUDA GPU, and CuPy finds none; use device 'cpu'")
        _cuda_module = cupy
    return _cuda_module


def use_cuda_module(module):
    """Make `module` the array module of device "cuda" in place of CuPy; returns the previous one.

    `module` must offer CuPy's API and rules (the test suite's CPU stand-in does, so CI runs
    the device path without a GPU); None goes back to importing CuPy on first use.
    """
    global _cuda_module
    previous, _cuda_module = _cuda_module, module
    return previous


def cuda_is_cupy():
    """True when device "cuda" is CuPy on a GPU (not a stand-in): CUDA kernels can run."""
    return _cupy().__name__ == "cupy"


def gpu_count():
    """How many GPUs CuPy finds (the stand-in says how many it pretends to have)."""
    return _cupy().cuda.runtime.getDeviceCount()


def use_gpu(index):
    """Make GPU `index` the current one: device "cuda" means it from now on (CuPy's per-thread
    current device). Call it before anything is put on the device."""
    _cupy().cuda.Device(index).use()


def current_stream():
    """The CUDA stream CuPy queues work on (.ptr for libraries such as NCCL, .synchronize())."""
    return _cupy().cuda.get_current_stream()


def nccl():
    """CuPy's NCCL binding (cupy.cuda.nccl), or None where CuPy finds no NCCL library.

    CuPy does not import it with cupy.cuda; its `available` flag says whether the library loaded.
    """
    try:
        module = importlib.import_module(f"{_cupy().__name__}.cuda.nccl")
    except ImportError:
        return None
    return module if getattr(module, "available", False) else None


def check_device(device):
    """"cpu" or "cuda" for a device name, "cuda:0", or a torch.device (read through its .type and
    .index, so torch is never imported); anything else is a ValueError naming it."""
    name, index = device, None
    if not isinstance(device, str) and hasattr(device, "type"):  # torch.device("cuda", 0)
        name, index = device.type, device.index
    elif isinstance(device, str) and ":" in device:
        name, _, index = device.partition(":")
    if name not in DEVICES or index not in (None, 0, "0"):
        raise ValueError(f"unknown device {device!r}: expected one of {DEVICES} (or 'cuda:0', the current GPU)")
    return name


def default_device():
    return check_device(os.environ.get("TINYGRAD_LLM_DEVICE", "cpu"))


def module_for(device):
    """The array module (numpy or cupy) of a device."""
    return np if check_device(device) == "cpu" else _cupy()


def device_of(array):
    """"cuda" for a CuPy array, "cpu" for anything else (NumPy arrays, scalars, lists)."""
    return "cuda" if hasattr(array, "__cuda_array_interface__") else "cpu"


def xp_of(array):
    """The array module an array belongs to, so code runs unchanged on NumPy and CuPy."""
    return _cupy() if hasattr(array, "__cuda_array_interface__") else np


def to_device(array, device):
    """The array on `device`, without a copy when it is already there."""
    device = check_device(device)
    if device_of(array) == device:
        return array
    if device == "cpu":
        return _cupy().asnumpy(array)
    return _cupy().asarray(array)


def to_host(array):
    return to_device(array, "cpu")


def as_dtype(dtype):
    """A float dtype from a string or dtype; only float32 and float64 are supported."""
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported float dtype {dtype}: expected float32 or float64")
    return dtype


def get_default_dtype():
    return _default_dtype


def set_default_dtype(dtype):
    global _default_dtype
    _default_dtype = as_dtype(dtype)


def manual_seed(seed):
    """Seed the generator behind initialisation, dropout and sampling."""
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator


def generator():
    return _generator


def get_rng_state():
    """The generator's state as a JSON-able dict (stored in checkpoints)."""
    return _generator.bit_generator.state


def set_rng_state(state):
    _generator.bit_generator.state = state
