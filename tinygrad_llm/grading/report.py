"""The grader's report: text for a terminal, and Gradescope's results.json."""
import math

# Gradescope's autograder specification: the fields results.json may hold, and their values.
GRADESCOPE_FIELDS = {"score", "execution_time", "output", "output_format", "test_output_format",
                     "test_name_format", "visibility", "stdout_visibility", "extra_data", "tests", "leaderboard"}
GRADESCOPE_TEST_FIELDS = {"score", "max_score", "status", "name", "name_format", "number", "output",
                          "output_format", "tags", "visibility", "extra_data"}
GRADESCOPE_VISIBILITY = ("hidden", "after_due_date", "after_published", "visible")
GRADESCOPE_STATUS = ("passed", "failed")


def score_of(result, weight):
    return float(weight) if result.status == "pass" else 0.0


def format_result(result, exercise):
    head = f"{result.status.upper():8} {result.name:27} ({exercise.chapter}, {result.seconds:.1f} s)"
    if result.status == "pass":
        return f"{head}  {result.message}"
    return head + "\n" + "\n".join("    " + line for line in result.message.splitlines())


def reproduce_line(solution, seed):
    return f"seed {seed}: `tinygrad-llm grade {solution} --seed {seed}` draws the same inputs again"


def format_report(solution, results, exercises, weights, seed):
    lines = [format_result(r, exercises[r.name]) for r in results]
    passed = sum(r.status == "pass" for r in results)
    score = sum(score_of(r, weights[r.name]) for r in results)
    total = sum(weights[r.name] for r in results)
    lines.append(f"{passed}/{len(results)} exercises pass, score {score:g}/{total:g}; {reproduce_line(solution, seed)}")
    return "\n".join(lines)


def gradescope_results(solution, results, exercises, weights, hidden, seed, execution_time):
    """results.json as Gradescope's autograder specification defines it."""
    tests = []
    for number, result in enumerate(results, 1):
        exercise = exercises[result.name]
        tests.append({
            "name": f"{exercise.signature}",
            "number": str(number),
            "score": score_of(result, weights[result.name]),
            "max_score": float(weights[result.name]),
            "status": "passed" if result.status == "pass" else "failed",
            "output": f"{result.status}: {result.message}",
            "tags": [exercise.chapter],
            "visibility": "hidden" if result.name in hidden else "visible",
        })
    return {
        "score": sum(t["score"] for t in tests),
        "execution_time": math.ceil(execution_time),
        "output": reproduce_line(solution, seed),
        "visibility": "visible",
        "stdout_visibility": "hidden",
        "tests": tests,
    }
