"""What an exercise is, and how an answer is compared with the reference and diagnosed.

An exercise names a function a student writes, states the task and its math (the text of
the stub), draws inputs with a hypothesis strategy and holds the name of its torch
reference in reference/exercises.py. An answer is compared output by output,
element by element, |received - expected| <= atol + rtol |expected|, with the
tolerance the exercise states and the reason for it. A wrong answer is then held up
against the wrong answers known mistakes give (a sign error, a missing 1/N, a transposed
matrix, ...) to say which mistake it looks like.
"""
import functools
import importlib
import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    why: str

    def __str__(self):
        return f"rtol {self.rtol:g}, atol {self.atol:g}"


# Exact outputs (token ids, windows) are compared with ==.
EXACT = Tolerance(0.0, 0.0, "integer outputs: equal or wrong")


@dataclass(frozen=True)
class Mistake:
    """A known mistake, and what to tell the student who made it.

    `answer(**inputs)` returns the wrong answer the mistake gives (the whole answer, or only
    the output named `output` when the mistake lies in one output of several). Where the
    wrong answer is not one array (which of two tied tokens is dropped depends on the
    sort), `test(inputs, expected, received) -> bool` recognises it instead.
    """
    hint: str
    answer: object = None
    output: str = None
    test: object = None


@dataclass(frozen=True)
class Exercise:
    name: str
    chapter: str                 # "chapter 3", "appendix D"
    signature: str               # "softmax_backward(dout, y) -> dx"
    task: str                    # the stub's docstring: what to compute and the math
    inputs: object               # hypothesis strategy of dicts {argument name: value}, in call order
    reference: str               # "module:function" of the torch reference, imported where it runs
    tolerance: Tolerance
    outputs: tuple               # names of the outputs ("dx",) or ("dx", "dscale", "dshift")
    mistakes: tuple = ()
    weight: float = 1.0          # points: 2 or 3 for the longer derivations
    error_hints: tuple = field(default=())  # (text found in an exception message, hint)

    @property
    def arguments(self):
        return self.signature.split("(", 1)[1].split(")", 1)[0]

    def load_reference(self):
        module, function = self.reference.split(":")
        return getattr(importlib.import_module(module), function)

    def stub(self):
        body = "\n".join(("    " + line).rstrip() for line in self.task.strip("\n").splitlines())
        return (f"def {self.name}({self.arguments}):\n"
                f'    """{self.signature}\n\n{body}\n    """\n'
                f'    raise NotImplementedError("{self.name} is not written yet")\n')


# ---- comparing an answer with the reference -------------------------------------------------


class ShapeError(Exception):
    """The answer's structure (number of outputs, array shapes) is not the reference's."""


def _is_array_list(value):
    """A list of arrays (clip_grad_norm's grads), as opposed to one array written as a list."""
    return isinstance(value, list) and bool(value) and not all(
        isinstance(v, (int, float, np.integer, np.floating)) for v in value)


def parts(exercise, expected, received):
    """[(label, expected, received)] per output, and per item of an output that is a list of arrays."""
    out = []
    for name, e, r in zip(exercise.outputs, as_outputs(exercise, expected), as_outputs(exercise, received)):
        if _is_array_list(e):
            if not isinstance(r, (list, tuple)) or len(r) != len(e):
                raise ShapeError(f"{name} must be a list of {len(e)} arrays, got {type(r).__name__} "
                                 f"of length {len(r) if hasattr(r, '__len__') else 1}")
            out += [(f"{name}[{i}]", e_i, r_i) for i, (e_i, r_i) in enumerate(zip(e, r))]
        else:
            out.append((name, e, r))
    return out


def as_outputs(exercise, value):
    """The answer split into the exercise's named outputs, or ShapeError saying what is wrong."""
    if len(exercise.outputs) == 1:
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ShapeError(f"expected {len(exercise.outputs)} outputs ({', '.join(exercise.outputs)}), "
                         f"got one {type(value).__name__}")
    if len(value) != len(exercise.outputs):
        raise ShapeError(f"expected {len(exercise.outputs)} outputs ({', '.join(exercise.outputs)}), got {len(value)}")
    return list(value)


@dataclass
class Comparison:
    ok: bool
    ratio: float          # worst |received - expected| / (atol + rtol |expected|); <= 1 passes
    error: float          # the absolute error there
    where: str            # "dx[0, 2]"
    message: str          # what differs, with expected and received side by side


def _as_array(value):
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as error:
        raise ShapeError(f"cannot be read as an array ({error})") from None
    if array.dtype == object:
        raise ShapeError(f"cannot be read as an array of numbers (got {type(value).__name__})")
    return array


def compare(exercise, expected, received):
    """Compare the whole answer with the reference's; the worst element decides."""
    tol = exercise.tolerance
    worst = Comparison(True, 0.0, 0.0, "", "")
    for label, e, r in parts(exercise, expected, received):
        e, r = _as_array(e), _as_array(r)
        if e.shape != r.shape:
            shown = (f":\n    expected {e.tolist()}\n    received {r.tolist()}" if max(e.size, r.size) <= 64 else "")
            raise ShapeError(f"{label} has shape {r.shape}, expected {e.shape}{shown}")
        if e.size == 0:
            continue
        part = _compare_arrays(label, e.astype(np.float64), r.astype(np.float64) if r.dtype.kind in "biuf"
                               else r, tol)
        if not part.ok:
            return part
        if part.ratio >= worst.ratio:
            worst = part
    return worst


def _compare_arrays(label, e, r, tol):
    if r.dtype.kind not in "biuf":
        raise ShapeError(f"{label} holds {r.dtype} values, expected numbers")
    same = (e == r) | (np.isnan(e) & np.isnan(r))  # equal infinities and NaN where NaN is expected
    with np.errstate(invalid="ignore"):
        err = np.where(same, 0.0, np.abs(r - e))
    err = np.where(np.isnan(err), np.inf, err)
    allowed = tol.atol + tol.rtol * np.where(np.isfinite(e), np.abs(e), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / allowed)
    index = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    where = f"{label}[{', '.join(map(str, index))}]" if e.ndim else label
    worst = float(ratio[index])
    ok = worst <= 1.0
    message = "" if ok else _side_by_side(label, e, r, ratio, tol)
    return Comparison(ok, worst, float(err[index]), where, message)


def _side_by_side(label, e, r, ratio, tol, rows=8):
    """The elements that differ most, expected and received in columns."""
    order = np.argsort(-ratio, axis=None, kind="stable")[:rows]
    bad = int((ratio > 1).sum())
    lines = [f"{label}: {bad} of {e.size} elements differ beyond the tolerance ({tol})",
             f"    {'index':<14}{'expected':>24}{'received':>24}{'difference':>14}"]
    for flat in order:
        if ratio.flat[flat] <= 1:
            break
        index = np.unravel_index(int(flat), e.shape)
        name = f"[{', '.join(map(str, index))}]" if e.ndim else "(scalar)"
        difference = r.flat[flat] - e.flat[flat]
        lines.append(f"    {name:<14}{e.flat[flat]:>24.16g}{r.flat[flat]:>24.16g}{difference:>14.3g}")
    return "\n".join(lines)


# ---- saying which mistake a wrong answer looks like ----------------------------------------


def _close(a, b, tol=1e-7):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False
    with np.errstate(invalid="ignore"):
        scale = max(float(np.max(np.abs(np.where(np.isfinite(b), b, 0.0)), initial=0.0)), 1e-300)
        return bool(np.all((a == b) | (np.abs(a - b) <= tol * scale + 1e-12) | (np.isnan(a) & np.isnan(b))))


def _sizes(inputs):
    """Candidate N for a missing 1/N: every axis size of the inputs and products of two."""
    sizes = {int(n) for v in inputs.values() for n in np.shape(v) if n > 1}
    sizes |= {a * b for a in sizes for b in sizes}
    sizes |= {math.prod(np.shape(v)) for v in inputs.values() if np.size(v) > 1}
    return sorted(sizes)


def diagnose(exercise, failures):
    """Hints for a wrong answer, from the failing (inputs, expected, received) seen, the smallest last.

    A known mistake is named when it gives the received answer on the smallest input and
    on every other failing input where it can be worked out, and differs from the
    reference there; otherwise the generic checks (sign, factor, transpose, shape,
    overflow) run on the smallest input.
    """
    inputs, expected, received = failures[-1]
    hints = [m.hint for m in exercise.mistakes
             if _explains(exercise, m, *failures[-1]) is True
             and all(_explains(exercise, m, *f) is not False for f in failures[:-1])]
    if hints:
        return hints
    try:
        compared = parts(exercise, expected, received)
    except ShapeError:
        return hints
    for label, e, r in compared:
        hints += _generic_hints(label, np.asarray(e, dtype=np.float64), r, inputs)
    return hints


def _explains(exercise, mistake, inputs, expected, received):
    """True or False: does the mistake give this wrong answer? None where it cannot be worked out."""
    try:
        with np.errstate(all="ignore"):
            if mistake.test is not None:
                return bool(mistake.test(inputs, expected, received))
            wrong = mistake.answer(**_copy(inputs))
            if wrong is None:
                return None
            if mistake.output is not None:
                index = exercise.outputs.index(mistake.output)
                received = as_outputs(exercise, received)[index]
                expected = as_outputs(exercise, expected)[index]
                same = _same
            else:
                same = functools.partial(_same_answer, exercise)
            if not same(wrong, received):
                return False
            # Where the mistake gives (nearly) the right answer, this input cannot tell.
            return None if same(wrong, expected) else True
    except Exception:  # the mistake's formula does not apply to these inputs (shapes that do not fit)
        return None


def _same(a, b):
    if _is_array_list(a) or _is_array_list(b):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_close(x, y) for x, y in zip(a, b)))
    return _close(a, b)


def _same_answer(exercise, a, b):
    try:
        return all(_same(x, y) for x, y in zip(as_outputs(exercise, a), as_outputs(exercise, b)))
    except ShapeError:
        return False


def _generic_hints(label, e, r, inputs):
    try:
        r = np.asarray(r, dtype=np.float64)
    except (TypeError, ValueError):
        return []
    if r.shape != e.shape:
        if r.size == e.size and sorted(r.shape) == sorted(e.shape) and r.ndim >= 2:
            return [f"{label} has the reference's sizes in another order: a transposed matrix?"]
        if [n for n in r.shape if n != 1] == [n for n in e.shape if n != 1]:
            return [f"{label} has shape {r.shape} where {e.shape} is expected: keepdims lost "
                    "(or an extra axis kept) in a reduction?"]
        return []
    if np.any(np.isnan(r) | (r == np.inf)) and not np.any(np.isnan(e) | (e == np.inf)):
        return [f"{label} holds NaN or inf where the reference does not: with large inputs exp() "
                "overflows; subtract the row maximum first (softmax(x) = softmax(x - max x))"]
    finite = np.isfinite(e) & np.isfinite(r)
    if not finite.any() or not np.any(e[finite]):
        return []
    e_f, r_f = e[finite], r[finite]
    if _close(r_f, -e_f):
        return [f"{label} is the negative of the reference: a sign error"]
    factor = float(np.dot(r_f, e_f) / np.dot(e_f, e_f))
    if abs(factor - 1) > 1e-6 and _close(r_f, factor * e_f):
        for n in _sizes(inputs):
            if math.isclose(factor, n, rel_tol=1e-6):
                return [f"{label} is {n} times the reference: a missing 1/N (N = {n})?"]
            if math.isclose(factor, 1 / n, rel_tol=1e-6):
                return [f"{label} is 1/{n} of the reference: divided by N = {n} once too often?"]
        return [f"{label} is {factor:.6g} times the reference: a constant factor is off"]
    if e.ndim >= 2 and e.shape[-1] == e.shape[-2] and _close(np.swapaxes(r, -1, -2), e):
        return [f"{label} is the reference transposed: a transposed matrix"]
    return []


def _copy(inputs):
    return {k: (v.copy() if isinstance(v, np.ndarray) else list(v) if isinstance(v, list) else v)
            for k, v in inputs.items()}
