"""A CPU stand-in for CuPy: NumPy underneath, CuPy's rules about the host on the outside.

The test suite installs it as the array module of device "cuda" (`backend.use_cuda_module`)
when no GPU is present, so CI runs the device path of every test and catches what would
break or crawl on a real GPU. It follows CuPy 14's own rules (cupy/_core/core.pyx,
_kernel.pyx, _scalar.pyx, _routines_indexing.pyx):

- An op takes device arrays, Python scalars (int, float, bool, complex) and NumPy scalars
  (np.float32(2.0), ...). A NumPy array operand raises TypeError("Unsupported type
  <class 'numpy.ndarray'>"), as CuPy's kernels do, whichever side it is on; comparisons
  alone accept a 0-d NumPy array (CuPy turns it into a scalar).
- Reductions return 0-d device arrays, never NumPy scalars.
- `np.asarray(device_array)` raises TypeError (CuPy's __array__): the host gets an array
  only through `.get()` or `asnumpy()`.
- Indexing and item assignment accept NumPy arrays and lists: CuPy copies them to the
  device (a host-to-device copy).
- float(), int(), bool(), .item(), .tolist(), repr() work, as in CuPy, but each one copies
  to the host and waits for the device: a sync.

Every copy between host and device is counted in `transfers` ("to_device", "to_host"),
so a test can assert that a training step copies the batch in, the loss out and nothing else.

`cuda` holds the part of cupy.cuda the library uses: a machine of `gpu_count` GPUs
(Device, runtime), the current stream, and NCCL (cuda.nccl) whose all-reduce really reduces
over the MPI ranks of a job (see the NCCL section below).
"""
import collections
import functools
import operator
import os
import socket
import sys
import types
import weakref

import numpy as np

transfers = collections.Counter()

_PYTHON_SCALARS = (int, float, bool, complex)


def reset_transfers():
    transfers.clear()


def _count(direction):
    transfers[direction] += 1


def _unsupported(value):
    return TypeError(f"Unsupported type {type(value)}")


def _operand(value, comparison=False):
    """The NumPy value behind an op's operand, refusing what CuPy refuses."""
    if isinstance(value, ndarray):
        return value._array
    if type(value) in _PYTHON_SCALARS or isinstance(value, np.generic):
        return value
    if comparison and isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    raise _unsupported(value)


def _index(value):
    """An index part: device arrays as they are, host arrays and lists copied to the device."""
    if isinstance(value, tuple):
        return tuple(_index(part) for part in value)
    if isinstance(value, ndarray):
        return value._array
    if isinstance(value, (np.ndarray, list)):
        _count("to_device")
        return np.asarray(value)
    return value


def _wrap(result):
    """NumPy results back on the device: arrays and scalars become device arrays (CuPy
    returns 0-d arrays from reductions), tuples and lists element by element."""
    if isinstance(result, np.ndarray):
        return ndarray(result)
    if isinstance(result, np.generic):
        return ndarray(np.asarray(result))
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    if isinstance(result, list):
        return [_wrap(r) for r in result]
    return result


def _unwrap_arguments(value):
    """Function arguments: device arrays unwrapped, host arrays refused, containers walked."""
    if isinstance(value, ndarray):
        return value._array
    if isinstance(value, np.ndarray):
        raise _unsupported(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap_arguments(v) for v in value)
    return value


def _device_function(numpy_function):
    @functools.wraps(numpy_function)
    def call(*args, **kwargs):
        args = [_unwrap_arguments(a) for a in args]
        kwargs = {k: _unwrap_arguments(v) for k, v in kwargs.items()}
        return _wrap(numpy_function(*args, **kwargs))

    return call


_COMPARISONS = {"greater", "greater_equal", "less", "less_equal", "equal", "not_equal"}


def _apply_ufunc(ufunc, method, inputs, kwargs):
    comparison = ufunc.__name__ in _COMPARISONS
    if method == "at":  # ufunc.at(a, indices, b): the indices are an index, not an operand
        a, indices, *rest = inputs
        getattr(ufunc, "at")(_operand(a), _index(indices), *(_operand(r) for r in rest))
        return None
    arrays = [_operand(x, comparison) for x in inputs]
    if "out" in kwargs:
        out = kwargs["out"]
        out = out if isinstance(out, tuple) else (out,)
        kwargs = {**kwargs, "out": tuple(_operand(o) for o in out)}
    result = getattr(ufunc, method)(*arrays, **kwargs)
    if "out" in kwargs:  # the caller's own out array(s), as NumPy returns them
        return out[0] if len(out) == 1 else out
    return _wrap(result)


class _DeviceUfunc:
    """cupy.exp, cupy.add, ...: device arrays and scalars in, device arrays out; .at, .reduce."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *inputs, **kwargs):
        return _apply_ufunc(self._ufunc, "__call__", inputs, kwargs)

    def __getattr__(self, method):
        if method not in ("at", "reduce", "accumulate", "outer", "reduceat"):
            return getattr(self._ufunc, method)
        return lambda *inputs, **kwargs: _apply_ufunc(self._ufunc, method, inputs, kwargs)


class _Flags:
    def __init__(self, array):
        self.c_contiguous = array.flags.c_contiguous
        self.f_contiguous = array.flags.f_contiguous
        self.owndata = array.flags.owndata


class ndarray(np.lib.mixins.NDArrayOperatorsMixin):
    """A "device" array: a NumPy array that only mixes with device arrays and scalars."""

    __slots__ = ("_array",)

    def __init__(self, array):
        self._array = array

    # The attribute backend.device_of looks for, as on a CuPy array.
    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self._array.ctypes.data, False),
                "version": 3, "strides": None if self.flags.c_contiguous else self._array.strides}

    @property
    def data(self):
        """The device memory behind the array (CuPy's MemoryPointer): .ptr is its first element's address."""
        return MemoryPointer(self._array)

    shape = property(lambda self: self._array.shape)
    dtype = property(lambda self: self._array.dtype)
    ndim = property(lambda self: self._array.ndim)
    size = property(lambda self: self._array.size)
    itemsize = property(lambda self: self._array.itemsize)
    nbytes = property(lambda self: self._array.nbytes)
    strides = property(lambda self: self._array.strides)
    flags = property(lambda self: _Flags(self._array))
    T = property(lambda self: ndarray(self._array.T))
    base = property(lambda self: None if self._array.base is None else ndarray(self._array.base))

    def __getattr__(self, name):
        # Array methods (reshape, sum, astype, swapaxes, ...): device in, device out. NumPy's
        # own protocols (__array_interface__, buffers) are not passed on: they would hand
        # NumPy the host memory behind the device array's back.
        if name.startswith("__"):
            raise AttributeError(name)
        attribute = getattr(self._array, name)
        return _device_function(attribute) if callable(attribute) else attribute

    # ---- the host boundary ----------------------------------------------------------------

    def get(self, stream=None, order="C", out=None, blocking=True):
        """A host copy (CuPy's explicit device-to-host copy)."""
        _count("to_host")
        return np.array(self._array, order=order)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def item(self):
        if self.size != 1:
            raise ValueError("can only convert an array of size 1 to a Python scalar")
        return self.get().item()

    def tolist(self):
        return self.get().tolist()

    def __int__(self):
        return int(self.get())

    def __float__(self):
        return float(self.get())

    def __complex__(self):
        return complex(self.get())

    def __bool__(self):
        if self.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous. "
                             "Use a.any() or a.all()")
        return bool(self.get())

    def __repr__(self):
        return repr(self.get())

    def __str__(self):
        return str(self.get())

    def __format__(self, spec):
        return format(self.get(), spec)

    def __reduce__(self):
        return array, (self.get(),)

    # ---- containers and indexing ----------------------------------------------------------

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    def __getitem__(self, index):
        return _wrap(self._array[_index(index)])

    def __setitem__(self, index, value):
        if isinstance(value, (np.ndarray, list)):
            _count("to_device")  # CuPy copies the value to the device first
            value = np.asarray(value)
        else:
            value = _operand(value)
        self._array[_index(index)] = value

    # ---- NumPy's protocols: ufuncs and functions on device arrays ----------------------------

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _apply_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        if np.ndarray in types:  # a host array among the arguments
            raise TypeError("Unsupported type <class 'numpy.ndarray'>")
        return _device_function(func)(*args, **kwargs)


# ---- the module's functions -----------------------------------------------------------------


def asarray(a, dtype=None, order=None):
    """Device arrays as they are (cast if asked); anything else is copied to the device."""
    if isinstance(a, ndarray):
        return a if dtype is None else a.astype(dtype, copy=False)
    _count("to_device")
    return ndarray(np.array(a, dtype=dtype, order=order or "K"))


def array(a, dtype=None, copy=True, order="K"):
    if isinstance(a, ndarray):
        return ndarray(np.array(a._array, dtype=dtype, copy=copy, order=order))
    _count("to_device")
    return ndarray(np.array(a, dtype=dtype, order=order))


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(order=order)
    return np.asarray(a, order=order)


def get_array_module(*args):
    return _this_module if any(isinstance(a, ndarray) for a in args) else np


def _creation(numpy_function):
    # zeros, ones, empty, arange ...: made on the device from shapes and scalars.
    @functools.wraps(numpy_function)
    def create(*args, **kwargs):
        return ndarray(numpy_function(*args, **kwargs))

    return create


_CREATION = ("zeros", "ones", "empty", "full", "arange", "linspace", "eye", "identity")
ndarray_functions = {name: _creation(getattr(np, name)) for name in _CREATION}


def __getattr__(name):
    # Every other NumPy name: dtypes and constants as they are; ufuncs and functions
    # turned into device versions that refuse host arrays.
    if name in ndarray_functions:
        return ndarray_functions[name]
    value = getattr(np, name)
    if isinstance(value, np.ufunc):
        return _DeviceUfunc(value)
    if isinstance(value, (type, types.ModuleType, float, int)) or not callable(value):
        return value
    return _device_function(value)


# ---- cupy.cuda: the GPUs, the stream, NCCL ---------------------------------------------------
#
# Arrays do not record which GPU holds them; the current GPU matters to NCCL alone, which
# (like NCCL itself) refuses two ranks of one machine on one GPU.

gpu_count = 2  # the stand-in machine's GPUs (a test may set another count)
_current_gpu = 0
_allocations = weakref.WeakValueDictionary()  # device pointer -> the NumPy array owning that memory


class MemoryPointer:
    """An array's `.data`: `.ptr` is the address NCCL is given. The stand-in remembers the array
    that owns the memory there, so an NCCL call can find what a pointer points at."""

    def __init__(self, array):
        self.ptr = array.ctypes.data
        owner = array
        while isinstance(owner.base, np.ndarray):  # a view: its memory lives as long as its base does
            owner = owner.base
        _allocations[self.ptr] = owner


class CUDARuntimeError(RuntimeError):
    pass


class Device:
    """cupy.cuda.Device(n): .id, and .use() makes it the current GPU."""

    def __init__(self, device=None):
        self.id = _current_gpu if device is None else operator.index(device)

    def use(self):
        global _current_gpu
        if not 0 <= self.id < gpu_count:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")
        _current_gpu = self.id


class Stream:
    """CuPy's default stream (null: .ptr 0). The stand-in finishes each op before it returns,
    so there is never anything to wait for."""

    ptr = 0

    def synchronize(self):
        pass


_null_stream = Stream()


def _submodule(name, **attributes):
    """A module `<this module>.name`, registered so that importlib finds it as it finds cupy.cuda.nccl."""
    module = types.ModuleType(f"{__name__}.{name}")
    vars(module).update(attributes)
    sys.modules[module.__name__] = module
    return module


# ---- NCCL (cupy.cuda.nccl, from cupy_backends/cuda/libs/nccl.pyx and nccl.pxd) -------------------
#
# The constants are NCCL's (ncclRedOp_t, ncclDataType_t) and the signatures CuPy's: pointers,
# counts, types and the stream are plain integers (Cython's intptr_t, size_t, int refuse a
# MemoryPointer or a Stream object). A communicator spans every rank of the MPI job (mpi4py's
# COMM_WORLD); its allReduce sums the arrays behind the pointers on every rank with MPI, and
# counts no transfer (NCCL moves GPU memory between GPUs, not through the host).
# `allreduces` logs the element count of each allReduce on this rank, for the tests.

NCCL_UNIQUE_ID_BYTES = 128
_NCCL_CONSTANTS = {"NCCL_SUM": 0, "NCCL_PROD": 1, "NCCL_MAX": 2, "NCCL_MIN": 3, "NCCL_AVG": 4,
                   "NCCL_INT8": 0, "NCCL_CHAR": 0, "NCCL_UINT8": 1, "NCCL_INT32": 2, "NCCL_INT": 2,
                   "NCCL_UINT32": 3, "NCCL_INT64": 4, "NCCL_UINT64": 5, "NCCL_FLOAT16": 6, "NCCL_HALF": 6,
                   "NCCL_FLOAT32": 7, "NCCL_FLOAT": 7, "NCCL_FLOAT64": 8, "NCCL_DOUBLE": 8, "NCCL_BFLOAT16": 9}
_NCCL_DTYPES = {0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64, 6: np.float16,
                7: np.float32, 8: np.float64}
_NCCL_MPI_OPS = {0: "SUM", 1: "PROD", 2: "MAX", 3: "MIN", 4: "SUM"}  # NCCL_AVG: the sum, then / ranks
allreduces = []


class NcclError(RuntimeError):
    pass


def _nccl_get_unique_id():
    """128 signed chars, as CuPy returns ncclUniqueId.internal."""
    return tuple(int(b) for b in np.frombuffer(os.urandom(NCCL_UNIQUE_ID_BYTES), dtype=np.int8))


def _nccl_buffer(pointer, count, datatype, name):
    """The `count` elements at a device pointer, refusing what NCCL would misread: a pointer no
    live array gave, another element type, memory past the end of the array."""
    owner = _allocations.get(operator.index(pointer))
    if owner is None:
        raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: {name} {pointer:#x} is not the .data.ptr of a live array")
    dtype = _NCCL_DTYPES.get(operator.index(datatype))
    if dtype is None or owner.dtype != dtype:
        raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: datatype {datatype} for {name}, an array of {owner.dtype}")
    start = pointer - owner.ctypes.data
    if not owner.flags.c_contiguous or start + operator.index(count) * owner.itemsize > owner.nbytes:
        raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: {name} holds fewer than {count} elements")
    return owner.reshape(-1)[start // owner.itemsize:][:count]


class NcclCommunicator:
    """NcclCommunicator(ndev, commId, rank): every rank of the MPI job, each on its own GPU."""

    def __init__(self, ndev, commId, rank):
        from mpi4py import MPI

        if type(commId) is not tuple:
            raise TypeError(f"Argument 'commId' has incorrect type (expected tuple, got {type(commId).__name__})")
        assert len(commId) == NCCL_UNIQUE_ID_BYTES
        self._world = MPI.COMM_WORLD
        # Gathered before any check, so that every rank sees the same fault and raises together.
        ranks = self._world.allgather((operator.index(ndev), operator.index(rank), commId,
                                       socket.gethostname(), _current_gpu))
        if any(n != self._world.Get_size() for n, *_ in ranks) or [r for _, r, *_ in ranks] != list(
                range(self._world.Get_size())):
            raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: the stand-in's communicator spans every MPI rank "
                            f"(ndev {self._world.Get_size()}, rank = the MPI rank); got {[r[:2] for r in ranks]}")
        if len({unique_id for _, _, unique_id, _, _ in ranks}) != 1:
            raise NcclError("NCCL_ERROR_INVALID_USAGE: the ranks hold different unique ids (rank 0's must reach all)")
        places = [(host, gpu) for *_, host, gpu in ranks]
        for r, place in enumerate(places):
            if place in places[:r]:
                raise NcclError(f"NCCL_ERROR_INVALID_USAGE: Duplicate GPU detected: rank {places.index(place)} "
                                f"and rank {r} both on CUDA device {place[1]}")
        self._ndev, self._rank, self._device = ndev, rank, _current_gpu

    def rank_id(self):
        return self._rank

    def size(self):
        return self._ndev

    def device_id(self):
        return self._device

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        from mpi4py import MPI

        operator.index(stream)
        if operator.index(op) not in _NCCL_MPI_OPS:
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: op {op}")
        send = _nccl_buffer(sendbuf, count, datatype, "sendbuf")
        recv = _nccl_buffer(recvbuf, count, datatype, "recvbuf")
        reduced = np.empty_like(send)
        self._world.Allreduce(np.ascontiguousarray(send), reduced, op=getattr(MPI, _NCCL_MPI_OPS[op]))
        recv[...] = reduced / self._ndev if op == _NCCL_CONSTANTS["NCCL_AVG"] else reduced
        allreduces.append(int(count))


cuda = _submodule(
    "cuda", Device=Device, Stream=Stream, MemoryPointer=MemoryPointer, get_current_stream=lambda: _null_stream,
    runtime=_submodule("cuda.runtime", CUDARuntimeError=CUDARuntimeError, getDeviceCount=lambda: gpu_count,
                       getDevice=lambda: _current_gpu),
    nccl=_submodule("cuda.nccl", available=True, NcclError=NcclError, NcclCommunicator=NcclCommunicator,
                    get_unique_id=_nccl_get_unique_id, **_NCCL_CONSTANTS))

_this_module = sys.modules[__name__]
