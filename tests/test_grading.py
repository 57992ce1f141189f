"""The grader: the library's own functions pass every exercise, planted mistakes fail with the
right hint, misbehaving solutions are contained, and results.json is what Gradescope reads."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import exercises as torch_answers
from tests.grading_solutions import mistakes
from tinygrad_llm.cli import main
from tinygrad_llm.grading import EXERCISES, check, grade
from tinygrad_llm.grading.report import (GRADESCOPE_FIELDS, GRADESCOPE_STATUS, GRADESCOPE_TEST_FIELDS,
                                         GRADESCOPE_VISIBILITY)

SOLUTIONS = Path(__file__).parent / "grading_solutions"
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
DESIGN_SIGNATURES = {  # the eight exercises DESIGN.md fixes, with its signatures
    "softmax_backward": "softmax_backward(dout, y) -> dx",
    "layer_norm_backward": "layer_norm_backward(dout, x, scale, eps) -> (dx, dscale, dshift)",
    "gelu_backward": "gelu_backward(dout, x) -> dx",
    "cross_entropy_backward": "cross_entropy_backward(logits, targets) -> dlogits",
    "causal_attention_forward": "causal_attention_forward(q, k, v) -> out",
    "adamw_step": "adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay) "
                  "-> (param, exp_avg, exp_avg_sq)",
    "top_p_filter": "top_p_filter(logits, top_p) -> logits",
    "bpe_merge": "bpe_merge(ids, pair, new_id) -> list",
}


def validate_gradescope(report):
    """results.json against Gradescope's autograder specification: field names, types, values."""
    assert set(report) <= GRADESCOPE_FIELDS, set(report) - GRADESCOPE_FIELDS
    assert isinstance(report["score"], float) and isinstance(report["execution_time"], int)
    assert report["visibility"] in GRADESCOPE_VISIBILITY and report["stdout_visibility"] in GRADESCOPE_VISIBILITY
    for test in report["tests"]:
        assert set(test) <= GRADESCOPE_TEST_FIELDS, set(test) - GRADESCOPE_TEST_FIELDS
        assert {"name", "score", "max_score", "status", "output", "visibility"} <= set(test)
        assert isinstance(test["name"], str) and isinstance(test["output"], str)
        assert isinstance(test["score"], float) and isinstance(test["max_score"], float)
        assert 0 <= test["score"] <= test["max_score"]
        assert test["status"] in GRADESCOPE_STATUS and test["visibility"] in GRADESCOPE_VISIBILITY
        assert (test["status"] == "passed") == (test["score"] == test["max_score"] > 0)
    assert report["score"] == sum(t["score"] for t in report["tests"])


@pytest.fixture(scope="module")
def library_run(tmp_path_factory):
    """The whole CLI run over every exercise with the library's own functions as the solution."""
    out = tmp_path_factory.mktemp("grade") / "results.json"
    run = subprocess.run([sys.executable, "-m", "tinygrad_llm", "grade", str(SOLUTIONS / "library.py"),
                          "--json", str(out), "--seed", "7", "--max-examples", "25", "--hidden", "adamw_step",
                          "--weight", "softmax_backward=3"],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    return run, json.loads(out.read_text())


def test_design_signatures_exist():
    for name, signature in DESIGN_SIGNATURES.items():
        assert EXERCISES[name].signature == signature


def test_library_solution_passes_every_exercise(library_run):
    run, report = library_run
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(EXERCISES)}/{len(EXERCISES)} exercises pass" in run.stdout
    assert "seed 7" in run.stdout and "Traceback" not in run.stderr
    assert [t["name"] for t in report["tests"]] == [e.signature for e in EXERCISES.values()]


def test_results_json_is_gradescopes_format(library_run):
    _, report = library_run
    validate_gradescope(report)
    by_name = {t["name"].split("(")[0]: t for t in report["tests"]}
    assert by_name["adamw_step"]["visibility"] == "hidden" and by_name["gelu_backward"]["visibility"] == "visible"
    assert by_name["softmax_backward"]["max_score"] == 3.0
    assert by_name["causal_attention_backward"]["max_score"] == EXERCISES["causal_attention_backward"].weight == 3
    assert report["score"] == sum(e.weight for e in EXERCISES.values()) - EXERCISES["softmax_backward"].weight + 3


def test_gradescope_validator_rejects_a_wrong_field():
    report = {"score": 1.0, "execution_time": 1, "visibility": "visible", "stdout_visibility": "hidden",
              "tests": [{"name": "x", "score": 1.0, "max_score": 1.0, "status": "ok", "output": "",
                         "visibility": "visible"}]}
    with pytest.raises(AssertionError):
        validate_gradescope(report)


@pytest.mark.parametrize("exercise, function, words", mistakes.MISTAKES, ids=[m[1] for m in mistakes.MISTAKES])
def test_planted_mistake_fails_with_its_hint(exercise, function, words):
    result = check(EXERCISES[exercise], getattr(mistakes, function), seed=0, max_examples=100)
    assert result.status == "fail", result.message
    assert words in result.message, result.message
    assert "smallest hypothesis found" in result.message and "expected" in result.message


def test_every_exercise_has_a_planted_mistake():
    assert {exercise for exercise, _, _ in mistakes.MISTAKES} == set(EXERCISES)


def test_misbehaving_solutions_are_contained():
    attributes = {"softmax_backward": "loops_forever", "gelu_backward": "allocates_20_gb", "bpe_merge": "raises",
                  "merge_heads": "exits", "linear_backward": "hard_exit", "top_k_filter": "crashes",
                  "split_heads": "spams_stderr_and_is_right"}
    names = [*attributes, "warmup_cosine_lr"]
    results = {r.name: r for r in grade(SOLUTIONS / "misbehaving.py", names, timeout=3, attributes=attributes,
                                        max_examples=20, jobs=2)}
    loop = results["softmax_backward"]
    assert loop.status == "timeout" and 3 <= loop.seconds < 7, (loop.status, loop.seconds)
    memory = results["gelu_backward"]
    assert memory.status == "error" and "MemoryError" in memory.message and "memory limit" in memory.message
    assert results["bpe_merge"].status == "error"
    assert "ZeroDivisionError: a bug in the solution" in results["bpe_merge"].message
    assert "Traceback" in results["bpe_merge"].message and "misbehaving.py" in results["bpe_merge"].message
    assert results["merge_heads"].status == "error" and "SystemExit: 3" in results["merge_heads"].message
    assert results["linear_backward"].status == "error" and "os._exit" in results["linear_backward"].message
    assert results["top_k_filter"].status == "error" and "segmentation fault" in results["top_k_filter"].message
    assert results["split_heads"].status == "pass"
    assert results["warmup_cosine_lr"].status == "missing"


def test_stubs_are_written_and_graded_as_not_written(tmp_path, capsys):
    stub = tmp_path / "solution.py"
    assert main(["exercises", "--stub", "softmax_backward", "bpe_merge", "--out", str(stub)]) == 0
    text = stub.read_text()
    assert "def softmax_backward(dout, y):" in text and "dx_i = y_i * (dout_i - sum_j dout_j y_j)" in text
    assert main(["exercises", "--stub", "all", "--out", str(stub)]) == 2  # never overwrites
    assert "exists already" in capsys.readouterr().err
    spec = importlib.util.spec_from_file_location("stub", stub)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("softmax_backward", "bpe_merge"):
        result = check(EXERCISES[name], getattr(module, name), max_examples=5)
        assert result.status == "error" and "is not written yet" in result.message


def test_exercises_lists_every_exercise(capsys):
    assert main(["exercises"]) == 0
    out = capsys.readouterr().out
    assert all(e.signature in out for e in EXERCISES.values())


@pytest.mark.parametrize("args, message", [
    (["missing.py"], "argument SOLUTION.py: {tmp}/missing.py does not exist"),
    (["s.py", "--exercise", "softmax_backwards"], "unknown exercise 'softmax_backwards'"),
    (["s.py", "--timeout", "0"], "argument --timeout: value must be > 0.0"),
])
def test_grade_refuses_bad_arguments(tmp_path, args, message):
    (tmp_path / "s.py").write_text("def softmax_backward(dout, y):\n    return dout\n")
    run = subprocess.run([sys.executable, "-m", "tinygrad_llm", "grade", *(str(tmp_path / args[0]), *args[1:])],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and message.format(tmp=tmp_path) in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_a_syntax_error_is_reported_for_every_exercise(tmp_path):
    (tmp_path / "s.py").write_text("def softmax_backward(dout, y)\n    return dout\n")
    (result,) = grade(tmp_path / "s.py", ["softmax_backward"])
    assert result.status == "error" and "does not parse" in result.message


def test_adamw_reference_is_torch_optim_adamw():
    # reference/exercises.py calls the update AdamW.step() runs; the two must agree.
    rng = np.random.default_rng(0)
    for step in (1, 3):
        param, grad, m = rng.standard_normal((3, 4))
        v = rng.random(4)
        p = torch.tensor(param, requires_grad=True)
        p.grad = torch.tensor(grad)
        optimizer = torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.1, foreach=False)
        optimizer.state[p] = {"step": torch.tensor(float(step - 1)), "exp_avg": torch.tensor(m),
                              "exp_avg_sq": torch.tensor(v)}
        optimizer.step()
        ours = torch_answers.adamw_step(param, grad, m, v, step, 0.1, (0.8, 0.95), 1e-3, 0.1)
        expected = (p.detach().numpy(), optimizer.state[p]["exp_avg"].numpy(), optimizer.state[p]["exp_avg_sq"].numpy())
        for a, b in zip(ours, expected):
            np.testing.assert_array_equal(a, b)


def test_gradescope_run_autograder(tmp_path):
    script = ROOT / "docs" / "gradescope" / "run_autograder"
    (tmp_path / "submission").mkdir()
    env = {**ENV, "AUTOGRADER": str(tmp_path), "SOURCE": str(ROOT), "PYTHON": sys.executable,
           "EXERCISES": "bpe_merge split_heads", "GRADE_OPTIONS": "--max-examples 10 --hidden split_heads"}
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=120, capture_output=True)
    report = json.loads((tmp_path / "results" / "results.json").read_text())
    assert report["score"] == 0.0 and "No solution.py" in report["output"] and set(report) <= GRADESCOPE_FIELDS
    (tmp_path / "submission" / "my_answers.py").write_text((SOLUTIONS / "library.py").read_text())
    subprocess.run(["bash", str(script)], env=env, check=True, timeout=120, capture_output=True)
    report = json.loads((tmp_path / "results" / "results.json").read_text())
    validate_gradescope(report)
    assert report["score"] == 2.0 and [t["visibility"] for t in report["tests"]] == ["visible", "hidden"]


def test_grading_without_the_references_says_what_is_missing(tmp_path, capsys, monkeypatch):
    # A worker that cannot import the references (no torch, no checkout) is one clear error.
    (tmp_path / "s.py").write_text("def bpe_merge(ids, pair, new_id):\n    return ids\n")
    monkeypatch.setattr("tinygrad_llm.grading.runner._child_environment",
                        lambda: {**os.environ, "PYTHONPATH": "", "PYTHONNOUSERSITE": "1", "PYTHONSAFEPATH": "1"})
    monkeypatch.chdir(tmp_path)
    assert main(["grade", str(tmp_path / "s.py")]) == 2
    err = capsys.readouterr().err
    assert "the grading process did not start" in err and "No module named" in err


def test_answers_as_python_lists_are_graded_as_arrays():
    from tests.grading_solutions import library

    result = check(EXERCISES["merge_heads"], lambda x: library.merge_heads(x).tolist(), max_examples=10)
    assert result.status == "pass", result.message
    result = check(EXERCISES["clip_grad_norm"], lambda grads, max_norm: tuple(library.clip_grad_norm(grads, max_norm)),
                   max_examples=10)
    assert result.status == "pass", result.message
    result = check(EXERCISES["clip_grad_norm"], lambda grads, max_norm: (grads + grads[:1], 0.0), max_examples=10)
    assert result.status == "fail" and "grads must be a list of" in result.message
