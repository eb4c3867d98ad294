"""The story playground: an HTTP API over a `Storyteller`, and a page at / to write stories in a browser.

    from gpt_tinystories import load, serve
    app = serve.create_app(load("runs/quickstart"), serve.Limits(max_new_tokens=500))
    serve.run(app, serve.bind("127.0.0.1", 8000))        # or any ASGI server: uvicorn.run(app)

One worker thread decodes one request at a time, its `n` samples as the rows of one batch; other requests
wait in a bounded queue. On a CPU one decode already keeps every core busy, so decoding two requests side
by side would only split the cores between them. The event loop never runs the model: the worker hands text
to it piece by piece, and a client that disconnects cancels its request, which stops the decode loop at the
next token (or drops the request from the queue before it starts).
"""

import asyncio
import contextlib
import errno
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .checkpoint import RunMeta, is_checkpoint
from .config import PRESETS
from .errors import UserError
from .generate import Sampling, Storyteller, TextStream, decode

log = logging.getLogger("gpt_tinystories.serve")

PAGE = "static/index.html"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many may wait: requests beyond these get 422 (or 503 when full)."""

    max_prompt_chars: int = 4000  # a prompt longer than the context keeps its last tokens anyway
    max_new_tokens: int = 1000
    max_samples: int = 4  # `n`: samples decoded together as the rows of one batch
    max_queue: int = 16  # requests waiting behind the one being decoded

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_new_tokens", "max_samples", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"serve limits: {name} must be a positive integer, got {value!r}")


def request_model(limits: Limits) -> type[BaseModel]:
    """The JSON body of a completion request, with this server's caps in its schema."""

    class CompletionRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: str = Field("", max_length=limits.max_prompt_chars, description="the start of the story")
        max_new_tokens: int = Field(min(200, limits.max_new_tokens), ge=1, le=limits.max_new_tokens)
        temperature: float = Field(0.8, ge=0, allow_inf_nan=False, description="0 is greedy")
        top_k: int | None = Field(None, ge=1)
        top_p: float | None = Field(None, gt=0, le=1)
        seed: int | None = Field(None, ge=0, lt=2**63, description="the same seed gives the same stories")
        n: int = Field(1, ge=1, le=limits.max_samples, description="how many stories to write")

    return CompletionRequest


class Job:
    """One request on its way through the worker: events go from the worker thread to the event loop.

    Events gather in a list, and the loop is woken once for all that arrived while it was busy: waking it
    once per token costs more than decoding a token of a small model."""

    def __init__(self, request: BaseModel, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.received = time.perf_counter()
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
    """The queue is full: the request is refused (503) rather than left waiting without bound."""


class StoryWorker:
    """A thread that decodes queued jobs one at a time, and counts what it did (for /health and the tests)."""

    def __init__(self, teller: Storyteller, max_queue: int) -> None:
        self.teller = teller
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.current: Job | None = None
        self.completed = 0
        self.cancelled = 0
        self.tokens_generated = 0  # every token decoded, EOS included, whether or not a client received it

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job) -> None:
        with self._start_lock:  # started on first use, so the app works under any ASGI server, lifespan or not
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="story-worker", daemon=True)
                self._thread.start()
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise Busy(f"the server is busy ({self._jobs.maxsize} requests are waiting); retry in a moment") from None

    def close(self) -> None:
        """Cancel what runs and what waits, and end the thread."""
        if self.current is not None:
            self.current.cancel()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.emit("error", {"error": "the server is shutting down"})
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=10)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancelled:  # its client left while it waited
                self._stopped(job)
                continue
            self.current = job
            try:
                self._decode(job)
            except Exception as error:  # a bug, not bad input (that is refused before it gets here): log it, go on
                log.exception("generation failed")
                job.emit("error", {"error": f"generation failed: {type(error).__name__}: {error}"})
            finally:
                self.current = None

    def _stopped(self, job: Job) -> None:
        self.cancelled += 1
        job.emit("cancelled", {})

    def _decode(self, job: Job) -> None:
        request, teller = job.request, self.teller
        model, tokenizer = teller.model, teller.tokenizer
        started = time.perf_counter()
        prompt = teller.encode_prompt(request.prompt)
        context = model.config.context_length
        job.emit("start", {"prompt_tokens": min(len(prompt), context), "prompt_truncated": len(prompt) > context,
                           "queue_seconds": started - job.received})  # fmt: skip
        generator = None
        if request.seed is not None:
            generator = torch.Generator(model.wte.weight.device).manual_seed(request.seed)
        sampling = Sampling(request.temperature, request.top_k, request.top_p)
        streams = [TextStream(tokenizer) for _ in range(request.n)]
        pieces: list[list[str]] = [[] for _ in range(request.n)]
        finish = ["length"] * request.n
        first_token = None
        steps = decode(model, [prompt] * request.n, request.max_new_tokens, sampling, tokenizer.eos_id, generator)
        try:
            for new in steps:
                if job.cancelled:
                    self._stopped(job)
                    return
                first_token = first_token or time.perf_counter()
                for index, token in enumerate(new):
                    if token is None:
                        continue
                    self.tokens_generated += 1
                    if token == tokenizer.eos_id:
                        finish[index] = "eos"
                    elif piece := streams[index].push(token):
                        pieces[index].append(piece)
                        job.emit("text", {"index": index, "text": piece, "tokens": len(streams[index].ids)})
        finally:
            steps.close()  # stops the decode loop now when a cancel left it suspended mid-story
        for index, stream in enumerate(streams):
            if tail := stream.flush():
                pieces[index].append(tail)
                job.emit("text", {"index": index, "text": tail, "tokens": len(stream.ids)})
        finished = time.perf_counter()
        samples = [
            {"index": index, "text": "".join(parts), "tokens": len(stream.ids), "finish_reason": reason}
            for index, (parts, stream, reason) in enumerate(zip(pieces, streams, finish, strict=True))
        ]
        completion_tokens = sum(sample["tokens"] for sample in samples)
        self.completed += 1
        job.emit("done", {
            "samples": samples,
            "prompt_tokens": min(len(prompt), context),
            "completion_tokens": completion_tokens,
            "timing": {
                "queue_seconds": started - job.received,
                "first_token_seconds": (first_token or finished) - job.received,
                "total_seconds": finished - job.received,
                "tokens_per_second": completion_tokens / max(finished - started, 1e-9),
            },
        })  # fmt: skip


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
        "parameters": model.num_parameters(),
        "config": config.to_dict(),
        "dtype": str(model.wte.weight.dtype).removeprefix("torch."),
        "device": str(model.wte.weight.device),
        "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "training": {key: getattr(meta, key) for key in ("step", "tokens", "val_loss", "best_val_loss")},
    }


def create_app(teller: Storyteller, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    worker = StoryWorker(teller, limits.max_queue)
    CompletionRequest = request_model(limits)  # noqa: N806 (a class)
    info = {**model_info(teller), "limits": asdict(limits)}
    page = resources.files(__package__).joinpath(PAGE).read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(title="gpt-tinystories playground", lifespan=lifespan)
    app.state.worker = worker

    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Busy, _busy)
    _add_info_routes(app, worker, info, page)

    def submit(body: BaseModel) -> Job:
        job = Job(body, asyncio.get_running_loop())
        worker.submit(job)
        return job

    @app.post("/api/generate")
    async def generate(body: CompletionRequest, request: Request) -> JSONResponse:  # type: ignore[valid-type]
        """The whole stories at once; a client that disconnects while waiting cancels its request."""
        job = submit(body)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            async for batch in job.events():
                kind, data = batch[-1]
                if kind == "done":
                    return JSONResponse(data)
                if kind == "error":
                    return JSONResponse(data, status_code=500)
            return JSONResponse({"error": "cancelled: the client disconnected"}, status_code=499)  # nobody reads it
        finally:
            watcher.cancel()

    @app.post("/api/generate/stream")
    async def generate_stream(body: CompletionRequest) -> StreamingResponse:  # type: ignore[valid-type]
        """Server-Sent Events: start, then text as it is written, then done (or error)."""
        job = submit(body)

        async def sse() -> AsyncIterator[str]:
            try:
                async for batch in job.events():
                    yield "".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n" for kind, data in batch)
            finally:  # the client is gone (the server cancels this generator) or the story is done
                job.cancel()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    return app


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = [f"{_field_name(e['loc'])}: {e['msg']}" for e in error.errors()]
    return JSONResponse({"error": "; ".join(problems), "detail": _jsonable(error.errors())}, status_code=422)


async def _busy(request: Request, error: Busy) -> JSONResponse:
    return JSONResponse({"error": str(error)}, status_code=503, headers={"Retry-After": "1"})


def _add_info_routes(app: FastAPI, worker: StoryWorker, info: dict, page: str) -> None:
    """The page, /health and /api/model: everything that does not generate."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "busy": worker.current is not None, "queued": worker.queued,
                "completed": worker.completed, "cancelled": worker.cancelled,
                "tokens_generated": worker.tokens_generated}  # fmt: skip

    @app.get("/api/model")
    async def model() -> dict:
        return info


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    # Starlette notices a disconnect only when asked; streams are cancelled by StreamingResponse itself
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    job.cancel()


def _field_name(location: tuple) -> str:
    parts = [str(part) for part in location if part != "body"]
    return ".".join(parts) or "request body"


def _jsonable(errors: list[dict]) -> list[dict]:
    # pydantic puts the exception object under ctx for some errors; keep only what JSON can hold
    return json.loads(json.dumps(errors, default=str))


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


def run(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on a socket from `bind()` until Ctrl-C (or SIGTERM)."""
    import uvicorn

    # timeout_graceful_shutdown: streams still open after Ctrl-C are cut after 3 s, not waited for
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])


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
