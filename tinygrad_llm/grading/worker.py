"""The process that grades: `python -m tinygrad_llm.grading.worker`, one per `grade` call.

It imports NumPy, torch, hypothesis and the references once (two seconds), single-threaded,
then reads jobs (one JSON object a line) on stdin and forks one child per job, so no child
pays for those imports again. It writes "started NAME PID" when a child starts and "ended
PID STATUS" (os.waitpid's status) when one ends. The parent kills a child past its time
limit through the child's own process group.

A child leaves the worker's session, sends its output to a log file, sets its limits (the
hard limits equal the soft ones, so the solution cannot raise them), imports the solution
file, runs `check` and writes the Result as JSON. Whatever the solution does (raise, exit,
print) becomes a Result; an endless loop, a crash or os._exit leave no result file, and
the parent reports those.
"""
import json
import os
import resource
import select
import signal
import sys
import traceback
from pathlib import Path


def _limit(kind, value):
    resource.setrlimit(kind, (value, value))


def run_job(job):
    """In the forked child: limits, then the solution, then the Result; never returns."""
    status = 1
    try:
        os.setsid()
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        _limit(resource.RLIMIT_AS, job["memory_mb"] << 20)
        _limit(resource.RLIMIT_CPU, job["cpu_seconds"])
        _limit(resource.RLIMIT_FSIZE, job["output_bytes"])
        _limit(resource.RLIMIT_CORE, 0)
        # Past the output limit, writes fail with an OSError (the default action would kill the process).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        result = _grade(job)
        with open(job["result"], "w") as f:
            json.dump(result, f)
        status = 0
    finally:
        os._exit(status)


def _grade(job):
    import importlib.util

    from . import EXERCISES
    from .runner import Result, check, result_to_json

    exercise = EXERCISES[job["exercise"]]
    solution = Path(job["solution"])
    try:
        sys.path.insert(0, str(solution.parent))  # a solution may import its own helper modules
        spec = importlib.util.spec_from_file_location("solution", solution)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        function = getattr(module, job["attribute"])
    except (Exception, SystemExit) as error:
        frames = traceback.format_exception(type(error), error, error.__traceback__)
        return result_to_json(Result(exercise.name, "error", f"importing {solution.name} failed:\n"
                                     + "".join(frames).rstrip(), float("nan"), 0, 0.0, job["seed"]))
    return result_to_json(check(exercise, function, seed=job["seed"], max_examples=job["max_examples"],
                                memory_mb=job["memory_mb"]))


def _say(line):
    os.write(1, (line + "\n").encode())


def serve():
    # Everything a child needs (NumPy, hypothesis, torch and the references), imported before any fork.
    from . import EXERCISES
    for exercise in EXERCISES.values():
        exercise.load_reference()
    _say("ready")
    children, pending = set(), b""
    stdin_open = True
    while stdin_open or children:
        readable, _, _ = select.select([0] if stdin_open else [], [], [], 0.02)
        if readable:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                job = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    run_job(job)
                children.add(pid)
                _say(f"started {job['exercise']} {pid}")
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            _say(f"ended {pid} {status}")


if __name__ == "__main__":
    serve()
