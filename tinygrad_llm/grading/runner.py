"""Running exercises: `check` in this process, `grade` each in a child process with limits.

`check` lets hypothesis draw inputs, calls the student's function and the reference on
each, and stops at the first wrong answer or exception; hypothesis then shrinks that input
to the smallest one that still fails, and replays it last, so the failure recorded last is
the one reported. `grade` has a worker process (worker.py) fork one child per exercise, at
most `jobs` at a time, each with a wall-clock timeout (the child is killed with its process
group), an address-space limit (a 20 GB allocation raises MemoryError), a CPU-time limit
and an output-file limit, so nothing one solution does reaches the grader or another
exercise.
"""
import ast
import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .exercise import EXACT, ShapeError, _copy, compare, diagnose

OUTPUT_LIMIT = 16 << 20  # bytes a child may print: more is cut off and reported as an error


@dataclass
class Result:
    name: str
    status: str        # "pass", "fail", "error", "timeout" or "missing" (the file lacks the function)
    message: str       # what went wrong, with the smallest failing input, or the worst error of a pass
    worst_error: float  # |received - expected| where a right answer came closest to the tolerance (nan: none)
    examples: int      # inputs on which the answer was right
    seconds: float
    seed: int


# ---- one exercise in this process --------------------------------------------------------


class _Wrong(Exception):
    """Raised inside hypothesis's test function so that it shrinks the input."""


def _show_inputs(inputs):
    with np.printoptions(precision=17, threshold=200, linewidth=100):
        lines = []
        for name, value in inputs.items():
            lines.append(f"    {name} = " + repr(value).replace("\n", "\n" + " " * (len(name) + 7)))
    return "\n".join(lines)


def _show_value(value):
    with np.printoptions(precision=17, threshold=200, linewidth=100):
        return repr(value)


def _error_hints(exercise, error, memory_mb):
    text = f"{type(error).__name__}: {error}"
    hints = [hint for needle, hint in exercise.error_hints if needle in text]
    if isinstance(error, NotImplementedError):
        hints.append(f"{exercise.name} is not written yet")
    if isinstance(error, MemoryError):
        hints.append(f"the memory limit is {memory_mb} MB: the exercise's inputs are small, so an allocation "
                     "this large comes from a bug (a wrong shape?)")
    if isinstance(error, RecursionError):
        hints.append("a recursion without end")
    return hints


@contextlib.contextmanager
def _one_torch_thread():
    """torch on one thread while the tiny references run: on a busy machine its thread pool's
    barriers cost milliseconds per op, a hundred times the op itself."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check(exercise, function, seed=0, max_examples=100, memory_mb=None):
    """Grade `function` on `exercise` here and now: a Result (status pass, fail or error)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hypothesis_seed

    reference = exercise.load_reference()
    # failure: the last (status, inputs, report, hints), which after shrinking is the smallest.
    # wrong_answers: (inputs, expected, received) of the first few wrong answers and the latest,
    # diagnosed once hypothesis is done: a mistake is named only if it fits them all.
    state = {"examples": 0, "worst": None, "failure": None, "wrong_answers": []}

    def wrong(inputs, expected, received, report):
        answers = state["wrong_answers"]
        state["wrong_answers"] = answers[:4] + answers[4:][-8:] + [(inputs, expected, received)]
        state["failure"] = ("fail", inputs, report, None)
        raise _Wrong

    start = time.perf_counter()

    @hypothesis_seed(seed)
    @settings(max_examples=max_examples, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
              phases=(Phase.generate, Phase.shrink), verbosity=Verbosity.quiet, print_blob=False)
    @given(exercise.inputs)
    def run(inputs):
        expected = reference(**_copy(inputs))
        try:
            with np.errstate(all="ignore"):
                received = function(*_copy(inputs).values())
        except (Exception, SystemExit) as error:
            frames = traceback.format_exception(type(error), error, error.__traceback__.tb_next)
            state["failure"] = ("error", inputs, "".join(frames).rstrip(), _error_hints(exercise, error, memory_mb))
            raise _Wrong from None
        try:
            comparison = compare(exercise, expected, received)
        except ShapeError as error:
            wrong(inputs, expected, received, f"{error}\n    expected: {_show_value(expected)}\n"
                                              f"    received: {_show_value(received)}")
        if not comparison.ok:
            wrong(inputs, expected, received, comparison.message)
        state["examples"] += 1
        if state["worst"] is None or comparison.ratio > state["worst"].ratio:
            state["worst"] = comparison

    try:
        with _one_torch_thread():
            run()
    except Exception:  # _Wrong from the replay of the shrunk input, or hypothesis's own report of it
        if state["failure"] is None:
            raise
    seconds = time.perf_counter() - start
    worst = state["worst"]
    worst_error = float("nan") if worst is None else worst.error
    if state["failure"] is None:
        if exercise.tolerance is EXACT or worst is None or worst.error == 0:
            summary = "every output equal to the reference's"
        else:
            summary = (f"worst error {worst.error:.3g} at {worst.where} "
                       f"({worst.ratio:.2g} of the tolerance: {exercise.tolerance})")
        return Result(exercise.name, "pass", f"{state['examples']} inputs, {summary}", worst_error,
                      state["examples"], seconds, seed)
    status, inputs, detail, hints = state["failure"]
    if hints is None:
        hints = diagnose(exercise, state["wrong_answers"])
    lead = "raised an exception on" if status == "error" else "gives a wrong answer on"
    lines = [f"{exercise.signature} {lead} this input (the smallest hypothesis found, after "
             f"{state['examples']} right answers):", _show_inputs(inputs), detail]
    lines += [f"hint: {hint}" for hint in dict.fromkeys(hints)]
    return Result(exercise.name, status, "\n".join(lines), worst_error, state["examples"], seconds, seed)


# ---- which exercises a solution file defines, without running it ----------------------------


def defined_names(path):
    """Top-level names a Python file defines (functions, assignments, imports), read with ast."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


# ---- every exercise in its own child process -----------------------------------------------


def _child_environment():
    env = dict(os.environ)
    # One thread each: the inputs are tiny, and the children run side by side.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TINYGRAD_LLM_NUM_THREADS"):
        env[name] = "1"
    # The torch references live in reference/ beside the package in a checkout of the repository.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _tail(path, limit=2000):
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        text = f.read().decode("utf-8", "replace")
    return ("..." if size > limit else "") + text


class GradingError(ValueError):
    """The grader itself cannot run (a ValueError, so the command line reports it without a traceback)."""


class _Worker:
    """The worker process (worker.py): jobs go in on its stdin, "started" and "ended" lines come out."""

    def __init__(self, log_path):
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "tinygrad_llm.grading.worker"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            env=_child_environment())
        self.buffer = b""
        if self.read_line(timeout=120) != "ready":
            self.process.kill()
            self.process.wait()
            raise GradingError("the grading process did not start (grading needs torch and hypothesis: "
                               "pip install -e '.[grade]' in a checkout of the repository, whose reference/ "
                               "holds the torch references); its output:\n" + _tail(log_path).rstrip())

    def read_line(self, timeout):
        """The next line from the worker, or None after `timeout` seconds without one."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                return None if self.buffer == b"" else self._take(len(self.buffer))
            self.buffer += chunk
        return self._take(self.buffer.index(b"\n"))

    def _take(self, n):
        line, self.buffer = self.buffer[:n].decode(), self.buffer[n + 1:]
        return line

    def start(self, job):
        self.process.stdin.write((json.dumps(job) + "\n").encode())
        self.process.stdin.flush()

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def _child_result(job, status, timed_out, seconds, seed):
    """The Result a finished child wrote, or what its end says when it wrote none."""
    name, timeout = job["exercise"], job["timeout"]
    if timed_out:
        return Result(name, "timeout", f"no answer within the time limit of {timeout:g} s: an endless loop, "
                                       "or far slower than needed (the reference takes milliseconds per input)",
                      float("nan"), 0, seconds, seed)
    result_path = Path(job["result"])
    if result_path.exists():
        result = Result(**json.loads(result_path.read_text()))
        result.seconds = seconds
        return result
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        why = {signal.SIGXCPU: "it ran out of CPU time", signal.SIGSEGV: "it crashed (segmentation fault)",
               signal.SIGKILL: "it was killed (out of memory?)", signal.SIGABRT: "it aborted"}
        reason = why.get(number, f"it was killed by signal {signal.Signals(number).name}")
    else:
        reason = (f"it exited with code {os.WEXITSTATUS(status)} before reporting a result "
                  "(os._exit in the solution?)")
    message = f"the process grading it ended early: {reason}"
    output = _tail(job["log"])
    if output.strip():
        message += "\nlast output:\n" + output.rstrip()
    return Result(name, "error", message, float("nan"), 0, seconds, seed)


def grade(solution, exercises, seed=0, max_examples=100, timeout=30.0, memory_mb=4096, jobs=None, attributes=None):
    """Grade the functions of the file `solution` named after `exercises` (names), each in its own process.

    `attributes` maps an exercise name to another function name in the file (default: the
    exercise's own name). Returns one Result per exercise, in the order given.
    """
    solution = Path(solution).resolve()
    attributes = attributes or {}
    jobs = jobs or len(os.sched_getaffinity(0))
    try:
        defined = defined_names(solution)
    except SyntaxError as error:
        message = f"{solution.name} does not parse: {error.msg} (line {error.lineno})"
        return [Result(name, "error", message, float("nan"), 0, 0.0, seed) for name in exercises]
    results = {}
    for name in exercises:
        if attributes.get(name, name) not in defined:
            results[name] = Result(name, "missing", f"{solution.name} defines no function {attributes.get(name, name)}",
                                   float("nan"), 0, 0.0, seed)
    with tempfile.TemporaryDirectory(prefix="tinygrad-llm-grade-") as folder:
        queue = [{"exercise": name, "solution": str(solution), "attribute": attributes.get(name, name),
                  "seed": seed, "max_examples": max_examples, "memory_mb": memory_mb, "timeout": timeout,
                  "cpu_seconds": int(math.ceil(timeout)) + 1, "output_bytes": OUTPUT_LIMIT,
                  "result": os.path.join(folder, f"{name}.json"), "log": os.path.join(folder, f"{name}.log")}
                 for name in exercises if name not in results]
        worker = _Worker(os.path.join(folder, "worker.log"))
        running = {}  # pid -> [job, start time, timed out]
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    job = queue.pop(0)
                    worker.start(job)
                    line = worker.read_line(timeout=60)
                    while line is not None and not line.startswith("started"):
                        _ended(line, running, results, seed)
                        line = worker.read_line(timeout=60)
                    if line is None:
                        raise GradingError("the grading process stopped answering")
                    running[int(line.split()[2])] = [job, time.monotonic(), False]
                line = worker.read_line(timeout=0.05)
                if line is not None:
                    _ended(line, running, results, seed)
                elif worker.process.poll() is not None:
                    raise GradingError("the grading process ended unexpectedly")
                for pid, entry in running.items():
                    if not entry[2] and time.monotonic() - entry[1] > entry[0]["timeout"]:
                        entry[2] = True
                        _kill_group(pid)
        finally:
            for pid in running:
                _kill_group(pid)
            worker.close()
    return [results[name] for name in exercises]


def _kill_group(pid):
    try:  # the whole group: anything the solution started goes too
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _ended(line, running, results, seed):
    _, pid, status = line.split()
    job, started, timed_out = running.pop(int(pid))
    results[job["exercise"]] = _child_result(job, int(status), timed_out, time.monotonic() - started, seed)


def result_to_json(result):
    return asdict(result)
