"""Reading safetensors files tensor by tensor from a memory map: checkpoints and GPT-2's weights.

safetensors itself validates the file when it opens (a well-formed header whose tensors
cover the data exactly); the header's offsets then give each tensor as a read-only NumPy
view of the mapped file. Copying such a view into a parameter reads the bytes straight from
the page cache: no second copy of the model is ever held in memory, so loading needs the
model's own memory and little more (benchmarks/loading.py measures it).

Only float tensors are weights. float16 and bfloat16 (NumPy has no bfloat16: its 16 bits
are the top half of a float32) are converted explicitly to the model's dtype; integer,
boolean and any other dtype is refused naming the tensor, since casting int8 or mislabelled
bytes to floats would load garbage that looks like weights. So are NaN and infinite values.
"""
import json
import os
import struct

import numpy as np

from . import backend

# safetensors' dtype names of the tensors that can be weights.
FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
NUMPY_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Elements scanned at a time by the NaN/inf check: its boolean temporary stays a few MB.
_SCAN_BLOCK = 1 << 22


class SafetensorsFile:
    """A safetensors file, its tensors as memory-mapped views.

    `what` names the file's role in messages ("checkpoint", "GPT-2 weights"). Raises
    FileNotFoundError for a missing file and ValueError naming the file for anything that
    is not a valid safetensors file (a pickle, a torch file, a truncated download, HTML).
    """

    def __init__(self, path, what="safetensors file"):
        from safetensors import safe_open

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{what} {self.path} does not exist")
        try:  # safetensors' own validation of the header and of the data's extent
            with safe_open(self.path, framework="np") as f:
                self.metadata = f.metadata() or {}
        except Exception as error:  # safetensors raises its own error type for a malformed file
            raise ValueError(f"{self.path} is not a safetensors {what} ({error}); a {what} is never "
                             "unpickled, so pickle and torch files are refused") from None
        with open(self.path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        header.pop("__metadata__", None)
        self._data_start = 8 + header_size
        self.entries = {name: (entry["dtype"], tuple(entry["shape"]), *entry["data_offsets"])
                        for name, entry in header.items()}
        self._map = np.memmap(self.path, np.uint8, mode="r")

    def names(self):
        return list(self.entries)

    def shape(self, name):
        return self.entries[name][1]

    def dtype_name(self, name):
        """The tensor's dtype as NumPy spells it (bfloat16 for BF16), or safetensors' name if no float."""
        dtype = self.entries[name][0]
        return NUMPY_NAMES.get(dtype, dtype)

    def check_weight(self, name, label=None, shape=None):
        """Refuse a tensor that is not float, has another shape than `shape`, or holds NaN/inf.

        `label` names it in messages (default: its name in the file). Reads the tensor once
        through the memory map, a block at a time.
        """
        label = label or repr(name)
        dtype, file_shape = self.entries[name][:2]
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{self.path}: tensor {label} has dtype {dtype}; weights must be float "
                             "(F32, F64, or F16/BF16, which are converted)")
        if shape is not None and file_shape != tuple(shape):
            raise ValueError(f"{self.path}: tensor {label} has shape {file_shape}, expected {tuple(shape)}")
        flat = self.view(name).reshape(-1)
        for start in range(0, flat.size, _SCAN_BLOCK):
            block = flat[start:start + _SCAN_BLOCK]
            if dtype == "BF16":
                block = _bfloat16_to_float32(block)
            finite = np.isfinite(block)
            if not finite.all():
                bad = int(np.argmin(finite))
                raise ValueError(f"{self.path}: tensor {label} holds {block[bad]} at flat index {start + bad}: "
                                 "a model with NaN or infinite weights computes nothing meaningful, so it is refused")

    def view(self, name):
        """The tensor as a read-only view of the file (BF16 as its raw uint16 bits)."""
        dtype, shape, begin, end = self.entries[name]
        numpy_dtype = FLOAT_DTYPES.get(dtype)
        if numpy_dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {dtype}, not a float")
        if begin == end:
            return np.zeros(shape, numpy_dtype)
        raw = self._map[self._data_start + begin:self._data_start + end]
        return raw.view(numpy_dtype).reshape(shape)

    def array(self, name, dtype):
        """The tensor in `dtype`: a view when the file holds that dtype, else a converted copy."""
        view = self.view(name)
        if self.entries[name][0] == "BF16":
            return _bfloat16_to_float32(view).astype(dtype, copy=False)
        return view if view.dtype == dtype else view.astype(dtype)

    def copy_into(self, name, target):
        """Copy the tensor into the backend array `target` (same shape), converting its dtype."""
        if self.entries[name][0] == "BF16":
            source = _bfloat16_to_float32(self.view(name))
        else:
            source = self.view(name)
        if backend.device_of(target) == "cpu":
            np.copyto(target, source, casting="same_kind")  # straight from the page cache into the weights
        else:
            target[...] = backend.to_device(np.asarray(source, dtype=target.dtype), backend.device_of(target))


def _bfloat16_to_float32(bits):
    """bfloat16 is the high 16 bits of a float32: shift them back into place."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)
