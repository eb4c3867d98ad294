"""A scripted OpenAI-compatible chat-completions server on loopback, for the grading tests.

What it answers depends on the completion being graded (the text after *** in the request):
    "grade:G"       a valid grade with every score G
    "refuse"        a refusal (the `refusal` field, no content)
    "sorry"         a plain-text refusal
    "malformed"     text that is not JSON
    "badscore"      JSON with a score out of range
    "busy:K"        429 (with retry-after-ms) the first K times, then a grade of 7
    "fail"          500 every time
    "deny"          403
    "bad"           400
    "hang"          a grade after 1 s (longer than the tests' timeout)
    "slow"          a grade of 5 after 0.2 s (to measure concurrency)
Requests without "Bearer test-key" get 401. Every request is counted per completion.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_SCRIPTS = {"slow", "hang", "fail", "bad", "deny", "refuse", "sorry", "badscore", "malformed"}


class ScriptedJudge:
    def __init__(self, default: str | None = None) -> None:
        self.default = default  # the script for any other completion (else: a malformed answer)
        self.requests: Counter = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                try:
                    status, payload, headers = judge.answer(self.path, self.headers.get("Authorization"), body)
                finally:
                    with judge.lock:
                        judge.in_flight -= 1
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ScriptedJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str, auth: str | None, body: dict) -> tuple[int, dict, dict]:
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}, {}
        if auth != "Bearer test-key":
            return 401, {"error": {"message": "Incorrect API key provided"}}, {}
        story = body["messages"][0]["content"].split(":\n\n", 1)[1].split("\n\nPlease provide", 1)[0]
        completion = story.split("***", 1)[1]  # the rubric shows "{prompt}***{completion}"
        with self.lock:
            self.requests[completion] += 1
            seen = self.requests[completion]
        if self.default and completion not in _SCRIPTS and not completion.startswith(("grade:", "busy:")):
            completion = self.default
        if completion.startswith("grade:"):
            return 200, _chat(_grade(float(completion[6:]))), {}
        if completion.startswith("busy:"):
            if seen <= int(completion[5:]):
                return 429, {"error": {"message": "Rate limit reached"}}, {"retry-after-ms": "10"}
            return 200, _chat(_grade(7)), {}
        if completion == "slow":
            time.sleep(0.2)
            return 200, _chat(_grade(5)), {}
        if completion == "hang":
            time.sleep(1.0)
            return 200, _chat(_grade(5)), {}
        if completion == "bad":
            return 400, {"error": {"message": "context length exceeded"}}, {}
        if completion == "deny":
            return 403, {"error": {"message": "This model is not available to you"}}, {}
        if completion == "fail":
            return 500, {"error": {"message": "internal error"}}, {}
        if completion == "refuse":
            return 200, _chat(None, refusal="I can't grade this."), {}
        if completion == "sorry":
            return 200, _chat("I'm sorry, but I cannot evaluate this story."), {}
        if completion == "badscore":
            return 200, _chat(json.dumps({**json.loads(_grade(5)), "plot": 11})), {}
        return 200, _chat("Grammar: 7/10. Creativity: 6/10."), {}


def _grade(score: float) -> str:
    return json.dumps({"assessment": "fine", "grammar": score, "creativity": score, "consistency": score,
                       "plot": score, "age_group": "C"})  # fmt: skip


def _chat(content: str | None, refusal: str | None = None) -> dict:
    message = {"role": "assistant", "content": content, "refusal": refusal}
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()), "model": "scripted",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip
