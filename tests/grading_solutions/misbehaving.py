"""Solutions that misbehave in every way a grader must survive, one function each."""
import ctypes
import os
import sys

import numpy as np


def loops_forever(*args):
    while True:
        pass


def allocates_20_gb(*args):
    return np.ones(20 * 2**30 // 8)  # 20 GB of float64, written, so it cannot stay lazily unmapped


def raises(*args):
    raise ZeroDivisionError("a bug in the solution")


def exits(*args):
    sys.exit(3)


def hard_exit(*args):
    os._exit(0)


def crashes(*args):
    ctypes.string_at(0)  # reads address 0: a segmentation fault


def spams_stderr_and_is_right(x, num_heads):
    for i in range(5000):
        print(f"debug line {i}", file=sys.stderr)
    B, T, C = x.shape
    return x.reshape(B, T, num_heads, C // num_heads).transpose(0, 2, 1, 3)
