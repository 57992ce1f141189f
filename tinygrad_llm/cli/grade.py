"""`tinygrad-llm grade SOLUTION.py`: grade a student's functions against the torch reference."""
import json
import secrets
import time
from pathlib import Path


def add_grade(subparsers):
    p = subparsers.add_parser(
        "grade", help="grade a solution file's exercise functions against the torch reference",
        description="Run every exercise SOLUTION.py defines (or those named with --exercise), each in its own "
                    "process with a time and a memory limit, on hypothesis-generated inputs, against the torch "
                    "reference. Exit code 0 when every exercise passes, 1 otherwise.")
    p.add_argument("solution", metavar="SOLUTION.py")
    p.add_argument("--exercise", nargs="+", metavar="NAME", help="grade these exercises (default: those the file defines)")
    p.add_argument("--json", metavar="RESULTS.json", help="also write Gradescope's results.json here")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds per exercise, start-up (about 2 s) included (default 30)")
    p.add_argument("--memory", type=int, default=4096, metavar="MB", help="address space per exercise (default 4096)")
    p.add_argument("--seed", type=int, help="hypothesis seed (default: a random one, printed)")
    p.add_argument("--max-examples", type=int, default=100, metavar="N", help="inputs per exercise (default 100)")
    p.add_argument("--jobs", type=int, metavar="N", help="exercises graded at once (default: the cores)")
    p.add_argument("--weight", nargs="+", default=[], metavar="NAME=W", help="points of an exercise (default: its own)")
    p.add_argument("--hidden", nargs="+", default=[], metavar="NAME",
                   help="exercises whose results Gradescope keeps from students (visibility hidden)")
    p.set_defaults(run=run_grade)


def _parse_weights(items, exercises):
    weights = {name: exercise.weight for name, exercise in exercises.items()}
    for item in items:
        name, _, value = item.partition("=")
        _check_names([name], exercises)
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--weight {item!r}: expected NAME=POINTS, such as softmax_backward=2") from None
    return weights


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
    if not solution.is_file():
        raise FileNotFoundError(f"no solution file {solution}")
    for option, value in (("--timeout", args.timeout), ("--memory", args.memory), ("--max-examples", args.max_examples)):
        if value <= 0:
            raise ValueError(f"{option} must be positive, got {value}")
    weights = _parse_weights(args.weight, EXERCISES)
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
