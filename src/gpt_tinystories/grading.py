"""LLM grading of story completions, the TinyStories paper's protocol, over any OpenAI-compatible endpoint.

The grader reads the story's beginning and the model's completion, separated by ***, and grades the
completion for grammar, creativity, consistency with the beginning and plot (0-10 each) and guesses the
writer's age group (A: 3 or under ... F: 13-16), as Eldan & Li asked GPT-4 to. It must answer with one JSON
object, parsed strictly: anything else is counted as unparseable, never scored.

Requests go through the official `openai` package (OpenAI, vLLM, llama.cpp's server and Ollama all speak its
chat-completions protocol), whose client retries 408/409/429/5xx and dropped connections with exponential
backoff (0.5 s doubling to 8 s, with jitter, or the server's Retry-After). A few threads send requests at once.
Grades are cached on disk in SQLite, keyed by (prompt, completion, judge model, rubric version), so an
interrupted or repeated run pays for nothing twice. Errors are counted by kind; a judge that cannot be
reached, or that refuses the key, the URL or the model, stops the run with a one-line error (the grades
already received stay cached).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

RUBRIC_VERSION = "tinystories-paper-v1"
SCORES = ("grammar", "creativity", "consistency", "plot")
AGE_GROUPS = {"A": "3 or under", "B": "4-5", "C": "6-7", "D": "8-9", "E": "10-12", "F": "13-16"}
ERROR_KINDS = ("unparseable", "refusal", "timeout", "http_429", "http_5xx", "http_4xx")
_REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry|i can(no|')t|i won'?t|i am unable|i'm unable)\b", re.I)
_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.S)

RUBRIC = """In the following exercise, the student is given a beginning of a story. The student needs to \
complete it into a full story. The exercise tests the student's language abilities and creativity. The symbol \
*** marks the separator between the prescribed beginning and the student's completion:

{prompt}***{completion}

Please provide your general assessment about the part written by the student (the one after the *** symbol). \
Is it grammatically correct? Is it consistent with the beginning of the story? Pay special attention to whether \
the student manages to complete the sentence which is split in the middle by the separator ***.

Then grade the student's completion in terms of grammar, creativity, consistency with the story's beginning and \
whether the plot makes sense, each as a number from 0 to 10, and give your best guess of the age of the student \
as reflected in the completion, choosing from these age groups: A: 3 or under. B: 4-5. C: 6-7. D: 8-9. \
E: 10-12. F: 13-16.

Answer with one JSON object and nothing else, in exactly this form:
{{"assessment": "<your general assessment>", "grammar": <0-10>, "creativity": <0-10>, "consistency": <0-10>, \
"plot": <0-10>, "age_group": "<one letter from A to F>"}}"""


def grading_messages(prompt: str, completion: str) -> list[dict]:
    return [{"role": "user", "content": RUBRIC.format(prompt=prompt, completion=completion)}]


class Ungraded(Exception):
    """An answer that cannot count as a grade; `kind` is one of ERROR_KINDS."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def parse_grade(content: str | None) -> dict:
    """The grade in a judge's answer: one JSON object (optionally in a ```json fence) with the four scores,
    numbers in [0, 10], and an age group A-F. Anything else raises Ungraded."""
    text = (content or "").strip()
    if fenced := _FENCE.match(text):
        text = fenced.group(1).strip()
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        kind = "refusal" if _REFUSAL.match(text) else "unparseable"
        raise Ungraded(kind, f"not a JSON object: {text[:80]!r}") from None
    if not isinstance(answer, dict):
        raise Ungraded("unparseable", f"a JSON {type(answer).__name__}, not an object")
    grade = {}
    for key in SCORES:
        value = answer.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 10:
            raise Ungraded("unparseable", f"{key} must be a number from 0 to 10, got {value!r}")
        grade[key] = float(value)
    age = answer.get("age_group")
    if not isinstance(age, str) or age.strip().upper()[:1] not in AGE_GROUPS or len(age.strip()) > 1:
        raise Ungraded("unparseable", f"age_group must be one letter from A to F, got {age!r}")
    grade["age_group"] = age.strip().upper()
    if isinstance(answer.get("assessment"), str):
        grade["assessment"] = answer["assessment"]
    return grade


class GradeCache:
    """Grades on disk (SQLite), keyed by prompt, completion, judge model and rubric version."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("CREATE TABLE IF NOT EXISTS grades (key TEXT PRIMARY KEY, grade TEXT NOT NULL)")
        self.db.commit()

    @staticmethod
    def key(prompt: str, completion: str, model: str) -> str:
        return hashlib.sha256(json.dumps([prompt, completion, model, RUBRIC_VERSION]).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        row = self.db.execute("SELECT grade FROM grades WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, grade: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO grades VALUES (?, ?)", (key, json.dumps(grade)))
        self.db.commit()  # one grade at a time: an interrupted run keeps every grade it received

    def close(self) -> None:
        self.db.close()


def default_cache_path() -> Path:
    from .data import default_cache_dir

    return default_cache_dir().parent / "judge-grades.sqlite"


@dataclass
class Judge:
    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    max_retries: int = 4
    timeout: float = 120.0
    cache: str | None = None  # default: default_cache_path()

    def api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise UserError(f"the judge's API key variable {self.api_key_env} is not set; export it (any "
                            "non-empty value for a local server that needs no key) or name another with "
                            "--judge-api-key-env")  # fmt: skip
        return key

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key=self.api_key(), max_retries=self.max_retries, timeout=self.timeout)


def ask(client, model: str, prompt: str, completion: str) -> dict:
    """One grade from the judge, or Ungraded; a judge that cannot serve any request raises UserError."""
    import openai

    try:
        response = client.chat.completions.create(model=model, messages=grading_messages(prompt, completion))
    except openai.APITimeoutError as error:
        raise Ungraded("timeout", str(error)) from None
    except openai.APIConnectionError as error:
        cause = error.__cause__ or error
        raise UserError(f"cannot reach the judge at {client.base_url} ({_one_line(cause)}); check --judge-url and "
                        "that the server is up, then run the same command again") from None  # fmt: skip
    except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as error:
        raise UserError(f"the judge at {client.base_url} refused the request ({error.status_code}: "
                        f"{_one_line(error.message)}); check the API key variable, --judge-url and --judge-model, "
                        "then run the same command again") from None  # fmt: skip
    except openai.RateLimitError as error:
        raise Ungraded("http_429", _one_line(error.message)) from None
    except openai.APIStatusError as error:
        raise Ungraded("http_5xx" if error.status_code >= 500 else "http_4xx",
                       f"{error.status_code}: {_one_line(error.message)}") from None  # fmt: skip
    if not response.choices:
        raise Ungraded("unparseable", "an answer with no choices")
    choice = response.choices[0]
    if getattr(choice.message, "refusal", None) or choice.finish_reason == "content_filter":
        raise Ungraded("refusal", _one_line(choice.message.refusal or "content filter"))
    return parse_grade(choice.message.content)


def grade_all(judge: Judge, items: Sequence[tuple[str, str]], on_done: Callable[[], None] | None = None) -> list[dict]:
    """A result per (prompt, completion): {"grade": {...}, "cached": bool} or {"error": kind, "detail": str}."""
    client = judge.client()
    cache = GradeCache(judge.cache or default_cache_path())
    keys = [GradeCache.key(prompt, completion, judge.model) for prompt, completion in items]
    results: list[dict | None] = [None] * len(items)
    try:
        todo = []
        for i, key in enumerate(keys):
            if (grade := cache.get(key)) is not None:
                results[i] = {"grade": grade, "cached": True}
                if on_done:
                    on_done()
            else:
                todo.append(i)
        with ThreadPoolExecutor(max_workers=judge.concurrency) as pool:
            futures = {pool.submit(ask, client, judge.model, *items[i]): i for i in todo}
            pending, fatal = set(futures), None
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    if future.cancelled():
                        continue
                    try:
                        results[futures[future]] = _result(future, cache, keys[futures[future]])
                    except UserError as error:
                        fatal = fatal or error
                    if on_done:
                        on_done()
                if fatal:  # a judge that cannot serve: stop sending, keep what the requests in flight bring
                    for future in pending:
                        future.cancel()
            if fatal:
                raise fatal
    finally:
        cache.close()
    return results  # type: ignore[return-value]


def _result(future, cache: GradeCache, key: str) -> dict:
    try:
        grade = future.result()
    except Ungraded as error:
        return {"error": error.kind, "detail": error.detail}
    cache.put(key, grade)  # only the main thread writes to the cache
    return {"grade": grade, "cached": False}


def grade_summary(results: Sequence[dict]) -> dict:
    """Counts of grades (fresh and cached) and of each kind of error."""
    errors = Counter(r["error"] for r in results if "error" in r)
    graded = [r for r in results if "grade" in r]
    return {"requested": len(results), "graded": len(graded), "from_cache": sum(r["cached"] for r in graded),
            "errors": {kind: errors.get(kind, 0) for kind in ERROR_KINDS}}  # fmt: skip


def _one_line(value: object) -> str:
    text = re.sub(r"^Error code: \d+ - ", "", str(value))  # the status is named already
    return " ".join(text.split())[:200]
