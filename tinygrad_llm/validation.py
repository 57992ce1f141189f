"""Checks of the numbers that come from outside: function arguments, config fields, CLI options.

Each check returns the value as a plain Python int or float, or raises one error that names
the thing (`name`) and the allowed range, so a bad value stops at the boundary instead of
turning into a NumPy traceback or silent garbage deep inside (a NaN learning rate, a float
stride, a negative layer count). The command line wraps the same checks as argparse types
(tinygrad_llm.cli.common), so an option and the argument it becomes are held to one rule.
A wrong type is a ValueError too (as int("x") is): the value is bad, whatever its kind.
"""
import math
import numbers


def _range_text(minimum, maximum, above=False, below=False):
    low = "" if minimum is None else f"{'>' if above else '>='} {minimum}"
    high = "" if maximum is None else f"{'<' if below else '<='} {maximum}"
    return " and ".join(part for part in (low, high) if part)


def integer(name, value, minimum=None, maximum=None):
    """`value` as an int in [minimum, maximum]; floats (even 2.0), bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {_range_text(minimum, maximum, False)}, got {value}")
    return value


def number(name, value, minimum=None, maximum=None, above=False, below=False):
    """`value` as a finite float >= minimum (> with above=True) and <= maximum (< with below=True).

    NaN and infinities are refused: no option of this library means anything at either.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    limits = _range_text(minimum, maximum, above, below)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' ' + limits if limits else ''}, got {value}")
    too_low = minimum is not None and (value <= minimum if above else value < minimum)
    too_high = maximum is not None and (value >= maximum if below else value > maximum)
    if too_low or too_high:
        raise ValueError(f"{name} must be {limits}, got {value!r}")
    return value


def boolean(name, value):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    return value
