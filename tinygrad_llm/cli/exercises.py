"""`tinygrad-llm exercises`: list the grading exercises, or write stubs to fill in."""
from pathlib import Path

from .common import output_file

DEFAULT_STUB_FILE = "solution.py"
STUB_HEADER = '''"""Exercises of tinygrad_llm: fill in each function, then run
    tinygrad-llm grade {path}
Inputs are NumPy float64 arrays (or lists and numbers where a docstring says so).
"""
import numpy as np
'''


def add_exercises(subparsers):
    p = subparsers.add_parser("exercises", help="list the grading exercises, or write stubs to fill in",
                              description="List the exercises `tinygrad-llm grade` checks; with --stub, write "
                                          "a Python file holding the named exercises' stubs and their tasks.")
    p.add_argument("--stub", nargs="+", metavar="NAME", help="exercises to write stubs for ('all' for every one)")
    # No default here: argparse would check a default string as a given value, even when only listing.
    p.add_argument("--out", type=output_file, metavar="FILE",
                   help=f"the stub file, which must not exist yet (default {DEFAULT_STUB_FILE})")
    p.set_defaults(run=run_exercises)


def run_exercises(args):
    from ..grading import EXERCISES

    if not args.stub:
        width = max(map(len, EXERCISES))
        for name, exercise in EXERCISES.items():
            print(f"{name:<{width}}  {exercise.chapter:<10}  {exercise.weight:g} pt  {exercise.signature}")
        return 0
    names = list(EXERCISES) if args.stub == ["all"] else list(dict.fromkeys(args.stub))
    unknown = [n for n in names if n not in EXERCISES]
    if unknown:
        raise ValueError(f"unknown exercise {unknown[0]!r}: expected 'all' or some of {', '.join(EXERCISES)}")
    out = Path(args.out or DEFAULT_STUB_FILE)
    if out.exists():
        raise ValueError(f"{out} exists already: choose another file with --out, or move it away")
    stubs = "\n\n".join(EXERCISES[name].stub() for name in names)
    out.write_text(STUB_HEADER.format(path=out) + "\n\n" + stubs)
    print(f"wrote {len(names)} stub{'s' * (len(names) > 1)} to {out}; grade them with `tinygrad-llm grade {out}`")
    return 0
