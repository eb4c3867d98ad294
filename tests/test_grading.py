"""LLM grading through the openai package against a scripted OpenAI-compatible server on loopback."""

import json
import socket

import pytest
from judge_server import ScriptedJudge

from gpt_tinystories.errors import UserError
from gpt_tinystories.grading import GradeCache, Judge, Ungraded, grade_all, grade_summary, parse_grade


@pytest.fixture
def server():
    with ScriptedJudge() as judge:
        yield judge


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "test-key")


def judge_for(server, tmp_path, **kw):
    url = server.url if server else kw.pop("url")
    return Judge(url, "scripted", "TEST_JUDGE_KEY", cache=str(tmp_path / "g.sqlite"),
                 **{"max_retries": 2, "timeout": 10, **kw})  # fmt: skip


def test_parse_grade_is_strict():
    text = json.dumps({"grammar": 8, "creativity": 6.5, "consistency": 7, "plot": 5, "age_group": "c"})
    assert parse_grade(text) == {"grammar": 8.0, "creativity": 6.5, "consistency": 7.0, "plot": 5.0, "age_group": "C"}
    assert parse_grade(f"```json\n{text}\n```")["plot"] == 5.0
    bad = [
        ("Grammar: 8", "unparseable"),
        ("I'm sorry, I can't help with that.", "refusal"),
        ("[1, 2]", "unparseable"),
        (json.dumps({"grammar": 8, "creativity": 6, "consistency": 7, "age_group": "C"}), "unparseable"),  # no plot
        (json.dumps({"grammar": 8, "creativity": 6, "consistency": 7, "plot": 10.5, "age_group": "C"}), "unparseable"),
        (json.dumps({"grammar": True, "creativity": 6, "consistency": 7, "plot": 1, "age_group": "C"}), "unparseable"),
        (json.dumps({"grammar": "8", "creativity": 6, "consistency": 7, "plot": 1, "age_group": "C"}), "unparseable"),
        (json.dumps({"grammar": 8, "creativity": 6, "consistency": 7, "plot": 1, "age_group": "G"}), "unparseable"),
        (f"Here it is: {text}", "unparseable"),
        (None, "unparseable"),
    ]
    for content, kind in bad:
        with pytest.raises(Ungraded) as caught:
            parse_grade(content)
        assert caught.value.kind == kind, content


def test_grades_refusals_malformed_429_and_500_are_counted_not_scored(server, key, tmp_path):
    items = [("Once upon a time", c) for c in ["grade:8", "grade:3", "refuse", "sorry", "malformed", "badscore",
                                               "busy:1", "fail"]]  # fmt: skip
    results = grade_all(judge_for(server, tmp_path), items)
    assert [r.get("grade", {}).get("plot") for r in results] == [8.0, 3.0, None, None, None, None, 7.0, None]
    assert [r.get("error") for r in results] == [None, None, "refusal", "refusal", "unparseable", "unparseable",
                                                 None, "http_5xx"]  # fmt: skip
    assert server.requests["busy:1"] == 2  # the 429 was retried (after the server's retry-after-ms), then graded
    assert server.requests["fail"] == 3  # 500: the first try and two retries, then counted
    summary = grade_summary(results)
    assert summary["graded"] == 3 and summary["from_cache"] == 0
    assert summary["errors"] == {"unparseable": 2, "refusal": 2, "timeout": 0, "http_429": 0, "http_5xx": 1,
                                 "http_4xx": 0}  # fmt: skip
    results = grade_all(judge_for(server, tmp_path, timeout=0.3, max_retries=0), [("A", "hang"), ("A", "bad")])
    assert [r["error"] for r in results] == ["timeout", "http_4xx"]
    assert results[1]["detail"] == "400: context length exceeded"
    results = grade_all(judge_for(server, tmp_path, max_retries=1), [("A", "busy:5")])
    assert results == [{"error": "http_429", "detail": "Rate limit reached"}]  # still 429 after its retry


def test_a_second_run_takes_grades_from_the_cache_and_asks_again_only_for_errors(server, key, tmp_path):
    items = [("Tom had a ball.", "grade:9"), ("Tom had a ball.", "malformed"), ("Sue sang.", "grade:9")]
    grade_all(judge_for(server, tmp_path), items)
    first = dict(server.requests)
    results = grade_all(judge_for(server, tmp_path), items)
    assert [r.get("cached") for r in results] == [True, None, True]
    assert server.requests["grade:9"] == first["grade:9"] == 2  # graded once per prompt, never again
    assert server.requests["malformed"] == 2  # errors are not cached: asked again
    # the key holds the prompt, the completion, the judge model and the rubric version
    assert GradeCache.key("a", "b", "m") != GradeCache.key("a", "b", "other-model")
    assert GradeCache.key("a", "b", "m") != GradeCache.key("a ", "b", "m")


def test_requests_in_flight_are_bounded(server, key, tmp_path):
    grade_all(judge_for(server, tmp_path, concurrency=3), [(f"Story {i}.", "slow") for i in range(9)])
    assert server.requests["slow"] == 9
    assert server.max_in_flight == 3


def test_a_judge_that_refuses_the_key_or_cannot_be_reached_stops_with_one_line(server, monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_JUDGE_KEY", "wrong-key")
    with pytest.raises(UserError, match=r"refused the request \(401: .*Incorrect API key.*check the API key variable"):
        grade_all(judge_for(server, tmp_path), [("A", "grade:5")])
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed when the block ends: nothing listens there
    with pytest.raises(UserError, match=r"cannot reach the judge at http://127.0.0.1:\d+/v1/ .*check --judge-url"):
        grade_all(judge_for(None, tmp_path, url=f"http://127.0.0.1:{port}/v1", max_retries=0), [("A", "grade:5")])
    monkeypatch.delenv("TEST_JUDGE_KEY")
    with pytest.raises(UserError, match="API key variable TEST_JUDGE_KEY is not set"):
        grade_all(judge_for(server, tmp_path), [("A", "grade:5")])


def test_grades_received_before_a_fatal_error_stay_cached(server, key, tmp_path):
    judge = judge_for(server, tmp_path, concurrency=1)
    with pytest.raises(UserError, match=r"refused the request \(403: This model is not available"):
        grade_all(judge, [("A", "grade:4"), ("A", "deny"), ("A", "grade:6")])
    cache = GradeCache(judge.cache)
    assert cache.get(GradeCache.key("A", "grade:4", "scripted"))["plot"] == 4.0
    cache.close()
