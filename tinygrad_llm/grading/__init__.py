"""Exercises a student writes, graded against the torch reference (`tinygrad-llm grade`).

Each exercise is one function: its task and math (the stub's docstring), a hypothesis
strategy for its inputs, its torch reference in reference/exercises.py and a tolerance
with its reason. `grade` runs each one in a child process with a time and a memory limit;
`check` runs one in this process (what the child does).
"""
from . import appendix_d, appendix_e, ch02, ch03, ch04, ch05, ch06, ch07, ch08
from .exercise import EXACT, Exercise, Mistake, Tolerance
from .runner import Result, check, grade

EXERCISES = {e.name: e for module in (ch02, ch03, ch04, ch05, ch06, ch07, ch08, appendix_d, appendix_e) for e in module.EXERCISES}

__all__ = ["EXERCISES", "EXACT", "Exercise", "Mistake", "Tolerance", "Result", "check", "grade"]
