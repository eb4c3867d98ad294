"""OpenAI-compatible routes over the story engine: POST /v1/completions, POST /v1/chat/completions, GET /v1/models.

What any OpenAI client (the `openai` package, UIs, libraries) can send and read: JSON bodies of OpenAI's shape,
Server-Sent Events of `data: {...}` chunks ending with `data: [DONE]`, `usage`, and errors as
`{"error": {"message", "type", "param", "code"}}`. Fields we cannot honour are accepted only at their neutral
value (`echo: false`, `logprobs: null`, penalties 0, ...); any other value, or a field OpenAI does not define, is
refused with 400, as are requests beyond the server's limits.

This is a story model, not a chat model: a chat request co-writes a story. The story so far is the `content` of
the user and assistant messages in order, joined by a space (system and developer messages are instructions the
model cannot follow, and are left out); the reply is its continuation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engine import Sampling


def _neutral(value: Any, neutral: tuple, name: str) -> Any:
    if value not in neutral:
        raise ValueError(f"{name} is not supported by this server; leave it out (or {neutral[0]!r})")
    return value


class _Common(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, strict=True, description="an extension of vLLM's and llama.cpp's servers")
    n: int = Field(1, ge=1, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63, strict=True)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None  # recorded by OpenAI for abuse monitoring; ignored here
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float, info) -> float:
        return _neutral(value, (0.0,), info.field_name)

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict | None) -> dict | None:
        return _neutral(value or None, (None,), "logit_bias")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(_Common):
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(16, ge=1, strict=True)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo", "logprobs", "best_of", "suffix")
    @classmethod
    def _neutral_fields(cls, value: Any, info) -> Any:
        return _neutral(value, {"echo": (False,), "best_of": (None, 1)}.get(info.field_name, (None,)), info.field_name)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls...: they do not change the story

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # parts: only text parts can go into a story
            return " ".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        return _neutral(value, (None, False), "logprobs")

    def story(self) -> str:
        """The story so far: user and assistant messages in order (see the module's docstring)."""
        parts = [m.text().strip() for m in self.messages if m.role in ("user", "assistant")]
        return " ".join(part for part in parts if part)


def add_routes(app: FastAPI, teller, limits, submit: Callable) -> None:
    from .serve import SSE_HEADERS, Work, finished

    model_id = teller.source.rstrip("/").split("/")[-1] or "gpt-tinystories"
    created = int(time.time())
    problem = app.state.problem

    def check(request: Request, body: _Common, prompts: list[str], max_tokens: int | None) -> Work | JSONResponse:
        """The request as engine work, or the OpenAI error for what this server refuses."""
        if body.model != model_id:
            return problem(request, 404, f"The model '{body.model}' does not exist; this server has '{model_id}' "
                           "(GET /v1/models)", "invalid_request_error", "model_not_found", param="model")  # fmt: skip
        max_tokens = max_tokens or limits.max_new_tokens
        for name, value, cap in (("max_tokens", max_tokens, limits.max_new_tokens), ("n", body.n, limits.max_samples),
                                 ("prompt", max(map(len, prompts)), limits.max_prompt_chars)):  # fmt: skip
            if value > cap:
                unit = " characters" if name == "prompt" else ""
                message = f"{name}: at most {cap}{unit} on this server, got {value}"
                return problem(request, 400, message, "invalid_request_error", None, param=name)
        sampling = Sampling(body.temperature, body.top_k, body.top_p)
        return Work(prompts, body.n, max_tokens, sampling, body.seed, tuple(body.stop or ()))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(model_id, created)]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request) -> Any:
        if name != model_id:
            return problem(request, 404, f"The model '{name}' does not exist", "invalid_request_error",
                           "model_not_found", param="model")  # fmt: skip
        return _model_card(model_id, created)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            return problem(request, 400, "prompt: give a string or a non-empty list of strings",
                           "invalid_request_error", None, param="prompt")  # fmt: skip
        work = check(request, body, prompts, body.max_tokens)
        return work if isinstance(work, JSONResponse) else await answer(request, body, work, _TextShape(model_id))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Any:
        work = check(request, body, [body.story()], body.max_completion_tokens or body.max_tokens)
        return work if isinstance(work, JSONResponse) else await answer(request, body, work, _ChatShape(model_id))

    async def answer(request: Request, body: _Common, work: Work, shape: _Shape) -> Any:
        job = submit(work)
        if body.stream:
            return StreamingResponse(_chunks(job, shape, body.include_usage), media_type="text/event-stream",
                                     headers=SSE_HEADERS)  # fmt: skip
        kind, data = await finished(job, request)
        if kind == "done":
            return shape.whole(data)
        if kind == "error":
            return problem(request, 500, data["error"], "server_error", "internal_error")
        return problem(request, 499, "cancelled: the client disconnected", "invalid_request_error", "cancelled")


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "gpt-tinystories"}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"  # eos and a stop string both end the story: "stop"


class _Shape:
    """How one kind of OpenAI response is shaped: the whole answer, and each streamed chunk."""

    kind = ""

    def __init__(self, model_id: str) -> None:
        self.model_id, self.id, self.created = model_id, f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())

    def envelope(self, choices: list, **extra) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model_id,
                "choices": choices, **extra}  # fmt: skip

    @staticmethod
    def usage(data: dict) -> dict:
        prompt, completion = data["prompt_tokens"], data["completion_tokens"]
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _TextShape(_Shape):
    kind, prefix = "text_completion", "cmpl"

    def whole(self, data: dict) -> dict:
        choices = [{"index": s["index"], "text": s["text"], "logprobs": None,
                    "finish_reason": _finish(s["finish_reason"])} for s in data["samples"]]  # fmt: skip
        return self.envelope(choices, usage=self.usage(data))

    def opening(self, choices: int) -> list[dict]:
        return []

    def piece(self, index: int, text: str | None, finish: str | None = None) -> dict:
        return self.envelope([{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}])


class _ChatShape(_Shape):
    kind, prefix = "chat.completion", "chatcmpl"

    def whole(self, data: dict) -> dict:
        choices = [{"index": s["index"], "message": {"role": "assistant", "content": s["text"]}, "logprobs": None,
                    "finish_reason": _finish(s["finish_reason"])} for s in data["samples"]]  # fmt: skip
        return self.envelope(choices, usage=self.usage(data))

    def opening(self, choices: int) -> list[dict]:
        return [self.piece(index, None, role=True) for index in range(choices)]

    def piece(self, index: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
        chunk = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self.envelope([chunk]), "object": "chat.completion.chunk"}


async def _chunks(job, shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """`data: {...}` chunks as the text is written, a last chunk per choice with its finish_reason, the usage
    if asked for, then `data: [DONE]`; an error mid-stream is sent as a chunk holding `error`."""

    def line(payload: Any) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    try:
        yield "".join(line(chunk) for chunk in shape.opening(job.work.choices))
        async for batch in job.events():
            out = []
            for kind, data in batch:
                if kind == "text":
                    out.append(line(shape.piece(data["index"], data["text"])))
                elif kind == "done":
                    out += [line(shape.piece(s["index"], None, _finish(s["finish_reason"]))) for s in data["samples"]]
                    if include_usage:
                        out.append(line({**shape.piece(0, None), "choices": [], "usage": shape.usage(data)}))
                    out.append(line("[DONE]"))
                elif kind == "error":
                    error = {"message": data["error"], "type": "server_error", "param": None, "code": "internal_error"}
                    out.append(line({"error": error}))
            yield "".join(out)
    finally:  # the client is gone (the server cancels this generator) or the answer is complete
        job.cancel()
