"""The judge over Ollama's /api/chat, against a stand-in server on 127.0.0.1, and the offline metrics."""
import socket

import pytest

from tests.ollama_server import Answer, Drop, HttpError, Slow, serve
from tinygrad_llm.finetune.instruct import (exact_match, format_input, generate_model_scores, judge_prompt,
                                            judge_responses, response_metrics, token_f1)
from tinygrad_llm.finetune.judge import JudgeError, JudgeUnavailableError, parse_score, query_model

ENTRY = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
         "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a bullet."}


def test_a_good_answer_and_the_books_request():
    with serve(lambda request: Answer("The score is 85.")) as server:
        assert query_model("How good?", model="llama3", url=server.url) == "The score is 85."
    (body,) = server.requests
    assert body == {"model": "llama3", "messages": [{"role": "user", "content": "How good?"}],
                    "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}


def test_the_books_judge_prompt():
    assert judge_prompt(ENTRY) == (
        f"Given the input `{format_input(ENTRY)}` and correct output `The car is as fast as lightning.`, "
        "score the model response `The car is as fast as a bullet.` on a scale from 0 to 100, where 100 is the "
        "best score. Respond with the integer number only.")


def test_a_slow_answer_past_the_timeout():
    with serve(lambda request: Slow(1.0, "85")) as server:
        with pytest.raises(JudgeError, match="did not answer within 0.2 s"):
            query_model("x", url=server.url, timeout=0.2)


def test_a_dropped_connection_is_not_a_partial_score():
    with serve(lambda request: Drop("100")) as server:  # "10" arrives, then the connection closes
        with pytest.raises(JudgeError, match="before the answer was complete"):
            query_model("x", url=server.url)


def test_no_server_at_all():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JudgeUnavailableError, match=f"no judge is answering at http://127.0.0.1:{port}/api/chat"):
        query_model("x", url=f"http://127.0.0.1:{port}/api/chat")


def test_an_http_error_names_the_servers_reason():
    with serve(lambda request: HttpError(404, "model 'llama3' not found, try pulling it first")) as server:
        with pytest.raises(JudgeUnavailableError, match="HTTP 404: model 'llama3' not found"):
            query_model("x", url=server.url)
        with pytest.raises(JudgeUnavailableError, match="HTTP 404"):  # the very first entry fails: no run at all
            judge_responses([ENTRY] * 3, url=server.url, progress=False)


def test_a_run_of_110_where_some_fail_reports_the_others():
    entries = [{**ENTRY, "model_response": f"response {i}"} for i in range(110)]

    def reply(request):
        i = int(request["messages"][0]["content"].split("`response ")[1].split("`")[0])
        kind = i % 10
        if kind == 3:
            return Answer("It is quite good.")
        if kind == 5:
            return Slow(0.5, "50")
        if kind == 7:
            return Drop("100")
        if kind == 8:
            return HttpError(500, "llama runner process has terminated")
        return Answer(f"{i % 90}\n")

    with serve(reply) as server:
        report = judge_responses(entries, url=server.url, timeout=0.1, progress=False)
    expected = {i: i % 90 for i in range(110) if i % 10 not in (3, 5, 7, 8)}
    assert {i: s for i, s in enumerate(report.scores) if s is not None} == expected
    reasons = dict(report.failures)
    assert sorted(reasons) == [i for i in range(110) if i % 10 in (3, 5, 7, 8)]
    assert reasons[3] == "could not convert score: 'It is quite good.'"
    assert "did not answer within 0.1 s" in reasons[5]
    assert "before the answer was complete" in reasons[7]
    assert "HTTP 500: llama runner process has terminated" in reasons[8]
    assert report.mean == pytest.approx(sum(expected.values()) / len(expected))
    assert report.summary().startswith(f"average score {report.mean:.2f} (scale 0-100) over 66 of 110 entries; 44")


def test_generate_model_scores_returns_the_scores_it_could_parse(capsys):
    answers = iter(["90", "ninety", "101", " 7 "])
    with serve(lambda request: Answer(next(answers))) as server:
        assert generate_model_scores([ENTRY] * 4, "model_response", url=server.url) == [90, 7]
    assert "entry 1: could not convert score: 'ninety'" in capsys.readouterr().out


def test_the_rubric_prompt_scores_from_1_to_5():
    answers = iter(["4", "0", "5"])
    with serve(lambda request: Answer(next(answers))) as server:
        report = judge_responses([ENTRY] * 3, url=server.url, prompt="rubric", progress=False)
    assert report.scores == [4, None, 5] and report.scale == (1, 5)
    assert "1: it does not follow the instruction" in server.requests[0]["messages"][0]["content"]
    with pytest.raises(ValueError, match="unknown judge prompt 'likert'"):
        judge_responses([ENTRY], prompt="likert")


@pytest.mark.parametrize("reply, score", [("85", 85), (" 85\n", 85), ("85.0", None), ("85/100", None),
                                          ("-3", None), ("100", 100), ("", None)])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_offline_metrics():
    assert exact_match("The answer is: Paris.", "answer is paris") == 1.0
    assert exact_match("Paris", "Lyon") == 0.0
    # normalised: [cat, sat] against [cat, sat, down]: precision 1, recall 2/3
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("y", "x") == 0.0
    metrics = response_metrics([ENTRY, {**ENTRY, "model_response": ENTRY["output"]}])
    # ENTRY: [car is as fast as bullet] against [car is as fast as lightning]: 5 of 6 shared
    assert metrics == {"exact_match": 0.5, "token_f1": pytest.approx((5 / 6 + 1) / 2), "count": 2}
