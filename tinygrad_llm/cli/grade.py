"""`tinygrad-llm grade SOLUTION.py`: grade a student's functions against the torch reference."""
import argparse
import json
import secrets
import time
from pathlib import Path

from .. import validation
from .common import existing_file, integer, number, output_file

# --memory: the worker that forks each exercise's process has NumPy, torch and hypothesis
# loaded (about 600 MB of address space), so less leaves no room for any solution. The
# largest limits are far beyond what grading needs and keep setrlimit's values in 64 bits.
MIN_MEMORY_MB = 1024
MAX_MEMORY_MB = 1 << 24
MAX_TIMEOUT = 86_400.0  # seconds: a day


def add_grade(subparsers):
    p = subparsers.add_parser(
        "grade", help="grade a solution file's exercise functions against the torch reference",
        description="Run every exercise SOLUTION.py defines (or those named with --exercise), each in its own "
                    "process with a time and a memory limit, on hypothesis-generated inputs, against the torch "
                    "reference. Exit code 0 when every exercise passes, 1 otherwise.")
    p.add_argument("solution", metavar="SOLUTION.py", type=existing_file)
    p.add_argument("--exercise", nargs="+", metavar="NAME", help="grade these exercises (default: those the file defines)")
    p.add_argument("--json", metavar="RESULTS.json", type=output_file, help="also write Gradescope's results.json here")
    p.add_argument("--timeout", type=number(minimum=0.0, maximum=MAX_TIMEOUT, above=True), default=30.0, metavar="S",
                   help="seconds per exercise, start-up (about 2 s) included (default 30)")
    p.add_argument("--memory", type=integer(minimum=MIN_MEMORY_MB, maximum=MAX_MEMORY_MB), default=4096, metavar="MB",
                   help=f"address space per exercise, at least {MIN_MEMORY_MB}: the grading process holds about "
                        "600 MB of it before a solution runs (default 4096)")
    p.add_argument("--seed", type=integer(minimum=0), help="hypothesis seed (default: a random one, printed)")
    p.add_argument("--max-examples", type=integer(minimum=1), default=100, metavar="N",
                   help="inputs per exercise (default 100)")
    p.add_argument("--jobs", type=integer(minimum=1), metavar="N", help="exercises graded at once (default: the cores)")
    p.add_argument("--weight", nargs="+", type=weight, default=[], metavar="NAME=POINTS",
                   help="points of an exercise, > 0 (default: its own)")
    p.add_argument("--hidden", nargs="+", default=[], metavar="NAME",
                   help="exercises whose results Gradescope keeps from students (visibility hidden)")
    p.set_defaults(run=run_grade)


def weight(text):
    """The type of --weight: NAME=POINTS with POINTS > 0, as (name, points); the name is checked later."""
    name, equals, points = text.partition("=")
    try:
        value = float(points)
    except ValueError:
        value = None
    if not (name and equals) or value is None:
        raise argparse.ArgumentTypeError(f"expected NAME=POINTS, such as softmax_backward=2, got {text!r}")
    try:
        return name, validation.number(f"the points of {name}", value, minimum=0.0, above=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _weights(given, exercises):
    _check_names([name for name, _ in given], exercises)
    return {**{name: exercise.weight for name, exercise in exercises.items()}, **dict(given)}


def _check_names(names, exercises):
    unknown = [n for n in names if n not in exercises]
    if unknown:
        raise ValueError(f"unknown exercise {unknown[0]!r}: `tinygrad-llm exercises` lists them "
                         f"({', '.join(exercises)})")


def run_grade(args):
    from ..grading import EXERCISES, grade
    from ..grading.report import format_report, gradescope_results
    from ..grading.runner import defined_names

    solution = Path(args.solution)
    weights = _weights(args.weight, EXERCISES)
    _check_names(args.hidden, EXERCISES)
    if args.exercise:
        _check_names(args.exercise, EXERCISES)
        names = list(dict.fromkeys(args.exercise))
    else:
        try:
            defined = defined_names(solution)
        except SyntaxError:
            defined = set(EXERCISES)  # every exercise then reports the syntax error
        names = [name for name in EXERCISES if name in defined]
        if not names:
            raise ValueError(f"{solution} defines none of the exercises: `tinygrad-llm exercises` lists them")
    seed = secrets.randbelow(2**32) if args.seed is None else args.seed
    print(f"grading {solution}: {len(names)} exercise{'s' * (len(names) > 1)}, {args.max_examples} inputs each, "
          f"{args.timeout:g} s and {args.memory} MB per exercise, seed {seed}", flush=True)
    start = time.perf_counter()
    results = grade(solution, names, seed=seed, max_examples=args.max_examples, timeout=args.timeout,
                    memory_mb=args.memory, jobs=args.jobs)
    elapsed = time.perf_counter() - start
    print(format_report(solution, results, EXERCISES, weights, seed))
    print(f"graded in {elapsed:.1f} s")
    if args.json:
        report = gradescope_results(solution, results, EXERCISES, weights, set(args.hidden), seed, elapsed)
        Path(args.json).write_text(json.dumps(report, indent=2, allow_nan=False))
    return 0 if all(r.status == "pass" for r in results) else 1
