"""The story playground: an HTTP API over a `Storyteller`, and a page at / to write stories in a browser.

    from gpt_tinystories import load, serve
    app = serve.create_app(load("runs/quickstart"), serve.Limits(max_new_tokens=500))
    serve.run(app, serve.bind("127.0.0.1", 8000))        # or any ASGI server: uvicorn.run(app)

One worker drives the decode engine (engine.py), on the main thread under `run()`, else on a thread of its own:
each step advances every running request by a token together (continuous batching), new requests join between
steps in free KV-cache slots, and more wait in a bounded queue. The event loop never runs the model: the worker
hands text to it piece by piece, and a client that disconnects cancels its request, whose slot is free at the
next step. Besides our own routes (/api/...), openai_api.py answers OpenAI's /v1/completions,
/v1/chat/completions and /v1/models.
"""

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import queue
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .checkpoint import RunMeta, is_checkpoint
from .config import PRESETS
from .engine import Engine, Sampling
from .errors import UserError
from .generate import Storyteller, TextStream
from .quantize import weights_dtype

log = logging.getLogger("gpt_tinystories.serve")

PAGE = "static/index.html"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may run and wait: requests beyond these get 422 (or 503 when
    full)."""

    max_prompt_chars: int = 4000  # a prompt longer than the context keeps its last tokens anyway
    max_new_tokens: int = 1000
    max_samples: int = 4  # `n`: samples of one request, each a sequence of the batch
    max_queue: int = 16  # sequences waiting for a KV-cache slot
    max_batch: int = 16  # KV-cache slots: sequences decoded together

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_new_tokens", "max_samples", "max_queue", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"serve limits: {name} must be a positive integer, got {value!r}")


def request_model(limits: Limits) -> type[BaseModel]:
    """The JSON body of a completion request, with this server's caps in its schema."""

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: str = Field("", max_length=limits.max_prompt_chars, description="the start of the story")
        # strict integers: JSON's true is no count (lax pydantic read it as 1, which made top_k greedy)
        max_new_tokens: int = Field(
            limits.max_new_tokens, ge=1, le=limits.max_new_tokens, strict=True, description="a cap"
        )
        temperature: float = Field(0.8, ge=0, allow_inf_nan=False, description="0 is greedy")
        top_k: int | None = Field(None, ge=1, strict=True)
        top_p: float | None = Field(None, gt=0, le=1)
        seed: int | None = Field(None, ge=0, lt=2**63, strict=True, description="the same seed gives the same stories")
        n: int = Field(1, ge=1, le=limits.max_samples, strict=True, description="how many stories to write")

    return CompletionRequest


@dataclass(frozen=True)
class Work:
    """What a request asks the engine for, whatever route it came by: one choice per prompt and sample."""

    prompts: list[str]  # the distinct prompts
    n: int  # samples of each prompt: choice i is prompt i // n, sample i % n, seeded with seed + i % n
    max_new_tokens: int
    sampling: Sampling
    seed: int | None = None
    stop: tuple[str, ...] = ()  # text that ends a choice (not included)

    @classmethod
    def of(cls, body: BaseModel) -> "Work":
        sampling = Sampling(body.temperature, body.top_k, body.top_p)
        return cls([body.prompt], body.n, body.max_new_tokens, sampling, body.seed)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


class Job:
    """One request on its way through the worker: events go from the worker thread to the event loop.

    Events gather in a list, and the loop is woken once for all that arrived while it was busy: waking it
    once per token costs more than decoding a token of a small model."""

    def __init__(self, work: Work, loop: asyncio.AbstractEventLoop) -> None:
        self.work = work
        self.received = time.perf_counter()
        self.first_token: float | None = None  # set by the worker, with the prompt's size in tokens
        self.prompt_tokens, self.prompt_truncated = 0, False
        self._loop = loop
        self._pending: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._wake_scheduled = False
        self._ready = asyncio.Event()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, kind: str, data: dict) -> None:
        """Called by the worker thread."""
        with self._lock:
            self._pending.append((kind, data))
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self.cancel()

    async def events(self) -> AsyncIterator[list[tuple[str, dict]]]:
        """Lists of the events that arrived since the last one: start, text..., and last done, error or cancelled."""
        while True:
            await self._ready.wait()
            with self._lock:
                batch, self._pending = self._pending, []
                self._ready.clear()
                self._wake_scheduled = False
            yield batch
            if batch[-1][0] in ("done", "error", "cancelled"):
                return


class Busy(Exception):
    """Every slot and the queue are full: the request is refused (503) rather than left waiting without bound."""


class _Choice:
    """One sequence of a job in the engine: its text so far, held back where it might begin a stop string."""

    def __init__(self, job: Job, index: int, sequence, tokenizer) -> None:
        self.job, self.index, self.sequence = job, index, sequence
        self.stream = TextStream(tokenizer)
        self.text, self.sent = "", 0  # the choice's text, and how much of it went out
        self.finish_reason: str | None = None

    def push(self, piece: str, final: bool = False) -> str:
        """The text that may go out now: none that could still turn out to begin a stop string."""
        self.text += piece
        stops = self.job.work.stop
        hit = min((i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            self.text, self.finish_reason, final = self.text[:hit], "stop", True
        hold = 0 if final else max((len(s) - 1 for s in stops), default=0)
        ready = self.text[self.sent : max(self.sent, len(self.text) - hold)]
        self.sent += len(ready)
        return ready


class BatchWorker:
    """A thread that drives the decode engine: every step advances all running requests together (continuous
    batching); it takes new requests between steps and counts what it did (for /health and the tests)."""

    def __init__(self, teller: Storyteller, limits: Limits, engine: Engine | None = None) -> None:
        self.teller, self.limits = teller, limits
        self.engine = engine or Engine(teller.model, limits.max_batch, compile=teller.compile, prefill_chunk=256)
        self.engine.isolate_errors = True  # a request that raises fails alone
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._choices: dict[int, _Choice] = {}  # engine sequence id -> its choice
        self._jobs: dict[Job, list[_Choice]] = {}  # jobs in the engine
        self._started: dict[Job, float] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._outstanding = 0  # sequences accepted and not finished: those running and those waiting
        self.waiting_jobs = 0
        self.completed = self.cancelled = self.failed = 0
        self.most_running = 0  # the most sequences decoded in one step so far
        self.tokens_generated = 0  # every token decoded, EOS included, whether or not a client received it

    @property
    def busy(self) -> bool:
        return bool(self._jobs) or not self._inbox.empty()

    @property
    def queued(self) -> int:
        """Requests accepted that have not started: waiting in the inbox or for a slot."""
        return self.waiting_jobs

    def submit(self, job: Job) -> None:
        with self._lock:  # started on first use, so the app works under any ASGI server, lifespan or not
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="story-engine", daemon=True)
                self._thread.start()
            if self._outstanding + job.work.choices > self.limits.max_batch + self.limits.max_queue:
                raise Busy(f"the server is busy ({self.limits.max_queue} requests are waiting); retry in a moment")
            self._outstanding += job.work.choices
            self.waiting_jobs += 1
        self._inbox.put(job)

    def run_here(self) -> None:
        """Drive the engine on the calling thread (instead of a thread of its own) until close() or Ctrl-C."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the worker is already running")
            self._thread = threading.current_thread()
        self._serve()

    def close(self) -> None:
        """Cancel what runs and what waits, and end the worker's loop (and its thread, if it has its own)."""
        if self._thread is not None:
            self._inbox.put(None)
            if self._thread not in (threading.current_thread(), threading.main_thread()):
                self._thread.join(timeout=10)

    def _serve(self) -> None:
        try:
            while self._take(block=not self.engine.busy):
                for job in [job for job in self._jobs if job.cancelled]:
                    self._end(job, "cancelled", {})
                if self.engine.busy:
                    self._step()
        finally:  # closed, or interrupted (Ctrl-C reaches the worker where it runs on the main thread)
            for job in list(self._jobs):
                self._end(job, "error", {"error": "the server is shutting down"})

    def _step(self) -> None:
        step_started = time.perf_counter()
        try:
            produced = self.engine.step()
        except Exception as error:  # not one request's fault (those fail alone, in the engine): fail them all
            log.exception("the decode engine failed")
            for job in list(self._jobs):
                self._end(job, "error", {"error": f"generation failed: {type(error).__name__}: {error}"})
            return
        self.most_running = max(self.most_running, len(produced))
        self._route(produced, step_started)

    def _take(self, block: bool) -> bool:
        """Move requests from the inbox into the engine; False once the worker is to stop."""
        while True:
            try:
                job = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if job is None:
                return False
            block = False
            if job.cancelled:  # its client left while it waited
                self._count_out(job, started=False)
                self.cancelled += 1
                job.emit("cancelled", {})
                continue
            self._add(job)

    def _add(self, job: Job) -> None:
        teller, work = self.teller, job.work
        prompts = [teller.encode_prompt(prompt) for prompt in work.prompts]
        choices = []
        for index in range(work.choices):
            seed = None if work.seed is None else work.seed + index % work.n
            sequence = self.engine.add(prompts[index // work.n], work.max_new_tokens, work.sampling,
                                       teller.tokenizer.eos_id, teller.generator(seed))  # fmt: skip
            choices.append(_Choice(job, index, sequence, teller.tokenizer))
            self._choices[sequence.id] = choices[-1]
        self._jobs[job] = choices
        context = teller.model.config.context_length
        job.prompt_tokens = sum(min(len(p), context) for p in prompts)
        job.prompt_truncated = any(len(p) > context for p in prompts)

    def _route(self, produced: list, step_started: float) -> None:
        """Hand each new token to its request as text; end the requests that are done."""
        for job, choices in list(self._jobs.items()):
            if job not in self._started and any(c.sequence.slot is not None for c in choices):
                self._started[job] = step_started
                with self._lock:
                    self.waiting_jobs -= 1
                job.emit("start", {"prompt_tokens": job.prompt_tokens, "prompt_truncated": job.prompt_truncated,
                                   "queue_seconds": step_started - job.received})  # fmt: skip
        touched = {}
        for sequence, token in produced:
            choice = self._choices.get(sequence.id)
            if choice is None or choice.finish_reason is not None:
                continue
            touched[choice.job] = True
            if token is None:  # it raised inside the engine
                error = sequence.error
                self._end(choice.job, "error", {"error": f"generation failed: {type(error).__name__}: {error}"})
                continue
            self.tokens_generated += 1
            job = choice.job
            job.first_token = job.first_token or time.perf_counter()
            if token != self.teller.tokenizer.eos_id and (piece := choice.push(choice.stream.push(token))):
                job.emit("text", {"index": choice.index, "text": piece, "tokens": len(choice.stream.ids)})
            if choice.finish_reason == "stop":
                self.engine.cancel(sequence)
            elif sequence.done:
                choice.finish_reason = sequence.finish_reason
        for job in touched:
            if job in self._jobs and all(c.finish_reason for c in self._jobs[job]):
                self._done(job)

    def _done(self, job: Job) -> None:
        samples = []
        for choice in self._jobs[job]:
            if tail := choice.push(choice.stream.flush(), final=True):
                job.emit("text", {"index": choice.index, "text": tail, "tokens": len(choice.stream.ids)})
            samples.append({"index": choice.index, "text": choice.text, "tokens": len(choice.stream.ids),
                            "finish_reason": choice.finish_reason})  # fmt: skip
        finished, started = time.perf_counter(), self._started.get(job, job.received)
        completion_tokens = sum(sample["tokens"] for sample in samples)
        self.completed += 1
        self._end(job, "done", {
            "samples": samples,
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": completion_tokens,
            "timing": {
                "queue_seconds": started - job.received,
                "first_token_seconds": (job.first_token or finished) - job.received,
                "total_seconds": finished - job.received,
                "tokens_per_second": completion_tokens / max(finished - started, 1e-9),
            },
        })  # fmt: skip

    def _end(self, job: Job, kind: str, data: dict) -> None:
        """Take a job out of the engine (its sequences free their slots at the next step) and tell its client."""
        for choice in self._jobs.pop(job, []):
            self.engine.cancel(choice.sequence)
            self._choices.pop(choice.sequence.id, None)
        self._count_out(job, started=job in self._started)
        self._started.pop(job, None)
        if kind == "cancelled":
            self.cancelled += 1
        elif kind == "error":
            self.failed += 1
        job.emit(kind, data)

    def _count_out(self, job: Job, started: bool) -> None:
        with self._lock:
            self._outstanding -= job.work.choices
            if not started:
                self.waiting_jobs -= 1


def model_info(teller: Storyteller) -> dict[str, Any]:
    """What /api/model reports: where the model came from, its shape, tokenizer and training progress."""
    model, tokenizer = teller.model, teller.tokenizer
    config = model.config
    meta = RunMeta.read(teller.source) if teller.source and is_checkpoint(teller.source) else RunMeta()
    shape = {"d_model": config.d_model, "n_layer": config.n_layer, "n_head": config.n_head}
    preset = next((name for name, values in PRESETS.items() if values == shape), None)
    return {
        "source": teller.source,
        "preset": preset,  # None: a shape of its own
        "trained_as": meta.train_config.get("preset"),
        "parameters": config.num_parameters(),  # from the shapes: int8 and fp16 matrices are buffers
        "config": config.to_dict(),
        "dtype": weights_dtype(model),
        "device": str(model.wte.weight.device),
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "training": {key: getattr(meta, key) for key in ("step", "tokens", "val_loss", "best_val_loss")},
    }


API_KEY_ENV = "GPT_TINYSTORIES_API_KEY"


def create_app(teller: Storyteller, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    """The playground's app. With `api_key`, every route but the page and /health wants `Authorization: Bearer
    KEY` (compared in constant time); the page asks for the key when it gets 401."""
    from . import openai_api

    limits = limits or Limits()
    worker = BatchWorker(teller, limits)
    info = {**model_info(teller), "limits": asdict(limits)}
    page = resources.files(__package__).joinpath(PAGE).read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(title="gpt-tinystories playground", lifespan=lifespan)
    app.state.worker = worker
    _add_guards(app, api_key)

    def submit(work: Work) -> Job:
        job = Job(work, asyncio.get_running_loop())
        worker.submit(job)
        return job

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "busy": worker.busy, "queued": worker.queued, "running": len(worker.engine.running),
                "most_running": worker.most_running, "max_batch": limits.max_batch,
                "completed": worker.completed, "cancelled": worker.cancelled,
                "failed": worker.failed, "tokens_generated": worker.tokens_generated}  # fmt: skip

    @app.get("/api/model")
    async def model() -> dict:
        return info

    _story_routes(app, request_model(limits), submit)
    openai_api.add_routes(app, teller, limits, submit)
    return app


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _story_routes(app: FastAPI, CompletionRequest: type[BaseModel], submit) -> None:  # noqa: N803 (a class)
    """Our own routes: the whole stories at once, or as Server-Sent Events."""

    @app.post("/api/generate")
    async def generate(body: CompletionRequest, request: Request) -> JSONResponse:  # type: ignore[valid-type]
        """The whole stories at once; a client that disconnects while waiting cancels its request."""
        job = submit(Work.of(body))
        kind, data = await finished(job, request)
        if kind == "done":
            return JSONResponse(data)
        if kind == "error":
            return JSONResponse(data, status_code=500)
        return JSONResponse({"error": "cancelled: the client disconnected"}, status_code=499)  # nobody reads it

    @app.post("/api/generate/stream")
    async def generate_stream(body: CompletionRequest) -> StreamingResponse:  # type: ignore[valid-type]
        """Server-Sent Events: start, then text as it is written, then done (or error)."""
        job = submit(Work.of(body))

        async def sse() -> AsyncIterator[str]:
            try:
                async for batch in job.events():
                    yield "".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n" for kind, data in batch)
            finally:  # the client is gone (the server cancels this generator) or the story is done
                job.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)


async def finished(job: Job, request: Request) -> tuple[str, dict]:
    """The last event of a job (done, error or cancelled); a client that disconnects meanwhile cancels it."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        async for batch in job.events():
            last = batch[-1]
        return last
    finally:
        watcher.cancel()


def _add_guards(app: FastAPI, api_key: str | None) -> None:
    """Error shapes (OpenAI's under /v1, ours elsewhere) and the API key check."""

    def problem(request: Request, status: int, message: str, kind: str, code: str | None, **extra) -> JSONResponse:
        headers = extra.pop("headers", None)
        if request.url.path.startswith("/v1/"):
            body = {"error": {"message": message, "type": kind, "param": extra.get("param"), "code": code}}
        else:
            body = {"error": message, **extra}
        return JSONResponse(body, status_code=status, headers=headers)

    app.state.problem = problem

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [f"{_field_name(e['loc'])}: {e['msg']}" for e in error.errors()]
        if request.url.path.startswith("/v1/"):  # OpenAI answers 400 for a bad request
            param = _field_name(error.errors()[0]["loc"]) if error.errors() else None
            return problem(request, 400, "; ".join(problems), "invalid_request_error", None, param=param)
        return problem(request, 422, "; ".join(problems), "", None, detail=_jsonable(error.errors()))

    @app.exception_handler(Busy)
    async def busy(request: Request, error: Busy) -> JSONResponse:
        return problem(request, 503, str(error), "server_error", "overloaded", headers={"Retry-After": "1"})

    if api_key:
        app.add_middleware(_KeyCheck, expected=f"Bearer {api_key}".encode(), problem=problem)


class _KeyCheck:
    """ASGI middleware: every route but the page and /health wants the API key (a plain ASGI layer, so
    streaming responses and disconnects pass through untouched)."""

    def __init__(self, app, expected: bytes, problem) -> None:
        self.app, self.expected, self.problem = app, expected, problem

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/", "/health"):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):  # constant time: the timing of a refusal says nothing
            return await self.app(scope, receive, send)
        message = "a valid API key is required: send the header 'Authorization: Bearer KEY'"
        response = self.problem(Request(scope), 401, message, "invalid_request_error", "invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        await response(scope, receive, send)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    # Starlette notices a disconnect only when asked; streams are cancelled by StreamingResponse itself
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    job.cancel()


def _field_name(location: tuple) -> str:
    parts = [str(part) for part in location if part != "body"]
    return ".".join(parts) or "request body"


def _jsonable(errors: list[dict]) -> list[dict]:
    # pydantic puts the exception object under ctx for some errors, and a refused NaN or Infinity stays the input
    # it names (JSON has neither: that answer was a 500); keep only what JSON can hold
    return json.loads(json.dumps(errors, default=str), parse_constant=str)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or a UserError saying what is wrong.

    It listens at once, so clients that connect before the server has started wait instead of being refused."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        raise UserError(f"--host {host!r} is not an address of this machine; use e.g. 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once, past old TIME_WAIT sockets
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use; pick another with --port (0: any free port)") from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host} is not an address of this machine; use e.g. 127.0.0.1") from None
        if error.errno == errno.EACCES:
            raise UserError(f"no permission to listen on port {port}; use a port above 1023") from None
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(2048)  # uvicorn's default backlog
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def run(app: FastAPI, sock: socket.socket, log_level: str = "info", on_ready: Callable[[], None] | None = None) -> None:
    """Serve `app` on a socket from `bind()` until Ctrl-C (KeyboardInterrupt, raised on) or SIGTERM (a service
    manager's stop: returns normally, so the process exits 0). `on_ready` runs once both are handled.

    The decode engine runs on this thread, the main one, and uvicorn on another. Why: the main thread made an
    OpenMP team while loading the model; a worker thread running torch would make a second one, and with more
    OpenMP threads than cores libgomp cuts its spin-waits for good, which made decoding on 2 cores ~1.6x slower."""
    import uvicorn

    # timeout_graceful_shutdown: streams still open after Ctrl-C are cut after 3 s, not waited for
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3))
    worker: BatchWorker = app.state.worker

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:  # however uvicorn stops, the engine's loop stops with it
            worker.close()

    http = threading.Thread(target=serve_http, name="http", daemon=True)
    previous = signal.signal(signal.SIGTERM, _terminate)
    http.start()
    try:
        if on_ready is not None:
            on_ready()
        worker.run_here()
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.should_exit = True
        http.join(timeout=10)


class _Terminated(KeyboardInterrupt):
    """SIGTERM: a KeyboardInterrupt, so that it stops the worker's loop wherever it waits, as Ctrl-C does."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


@contextlib.contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a background thread for the duration of a `with` block (tests, notebooks): yields its URL."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the playground server did not start")
        time.sleep(0.01)
    try:
        yield url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
