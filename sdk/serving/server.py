"""`edgeq serve`: an OpenAI-compatible HTTP server over loaded bundles, on FastAPI and uvicorn.

Endpoints: `/v1/chat/completions` (server-sent events with `stream`, tools, tool_choice,
response_format, stop, max_tokens, temperature, top_p, seed, usage), `/v1/completions`, `/v1/models`
and `/health`. A request names its model by the bundle's folder name ("bundle:NAME" for a kept LoRA adapter).

An engine holds one sequence (and one KV cache), so each model runs one request at a time on its own
worker thread, in arrival order; the requests waiting for it form a bounded queue, and one more is
answered 429 at once rather than left to time out. Each request has a deadline, and a client that
disconnects stops its generation at the next token. Request bodies are checked by pydantic models
(`serving_api.py`); anything malformed gets a 4xx in OpenAI's error shape, and no request can take the
server down. It binds 127.0.0.1 unless told otherwise; with an API key, every /v1 request must carry it
as a bearer token.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import EdgeqError
from ..generate import ChatChunk, LanguageModel

log = logging.getLogger(__name__)
INSTALL_HINT = "the server needs fastapi and uvicorn: pip install 'edgeq[serve]'"
MAX_BODY_BYTES = 4 << 20


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Slot:
    """One served model: its worker thread (one sequence at a time) and how many requests it holds."""

    model: LanguageModel
    queue_size: int
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeq-model"))
    held: int = 0  # running + waiting

    def admit(self) -> None:
        if self.held > self.queue_size:  # one running and queue_size waiting
            raise ApiError(429, f"model {self.model.name!r} is busy: {self.held - 1} requests already wait for it; retry later",
                           "rate_limit_error", "queue_full")
        self.held += 1


class Job:
    """A generation on a model's worker thread, handing its chunks to the event loop; `cancel()` stops it
    before its next token (client gone, deadline passed): `cancelled` is the event the generation checks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, chunks: Iterator[ChatChunk], deadline: float, cancelled: threading.Event):
        self.loop, self.source, self.deadline, self.cancelled = loop, chunks, deadline, cancelled
        self.chunks: asyncio.Queue = asyncio.Queue()
        self.timed_out = False

    def cancel(self) -> None:
        self.cancelled.set()

    def run(self) -> None:
        """Runs on the worker thread; ends with None on the queue (or the exception that stopped it)."""
        outcome: Any = None
        try:
            for chunk in self.source if not self.cancelled.is_set() else ():
                self.loop.call_soon_threadsafe(self.chunks.put_nowait, chunk)
                if self.cancelled.is_set():
                    break
                if time.monotonic() > self.deadline:
                    self.timed_out = True
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which answers it; the worker lives on
            outcome = exc
        finally:
            self.source.close()  # on this thread: closing the generation touches the engine
        self.loop.call_soon_threadsafe(self.chunks.put_nowait, outcome)


def now() -> int:
    return int(time.time())


class Service:
    """What the routes share: the served models, the API key, limits."""

    def __init__(self, models: list[LanguageModel], api_key: str | None, queue_size: int, timeout: float):
        self.slots: dict[str, Slot] = {}
        for model in models:
            if model.name in self.slots:
                raise EdgeqError(f"two served models are both named {model.name!r} (the bundle folder's name); rename one folder")
            self.slots[model.name] = Slot(model, queue_size)
        self.api_key, self.timeout = api_key, timeout
        self.created = now()

    def slot(self, name: str) -> Slot:
        return self.target(name)[0]

    def target(self, name: str) -> tuple[Slot, str | None]:
        """The slot serving `name`, and the adapter it names: "bundle" is the base, "bundle:NAME" the bundle's kept
        LoRA adapter NAME (switched per request on the one loaded base)."""
        bundle, _, adapter = (name, "", "") if name in self.slots else name.partition(":")
        if bundle not in self.slots:
            raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(self.names())}", code="model_not_found", param="model")
        slot = self.slots[bundle]
        if adapter and adapter not in slot.model.adapters:
            raise ApiError(404, f"model {bundle!r} has no adapter {adapter!r}; served: {', '.join(self.names())}",
                           code="model_not_found", param="model")
        return slot, adapter or None

    def names(self) -> list[str]:
        """Every model name a request may use: each bundle, and "bundle:NAME" for each of its kept adapters."""
        return [n for name, slot in self.slots.items() for n in (name, *(f"{name}:{a}" for a in slot.model.adapters))]

    def check_key(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'", "authentication_error", "invalid_api_key")

    async def run(self, name: str, chunks: Iterator[ChatChunk], cancel: threading.Event) -> Job:
        """Queues a generation (not started yet, made with `cancel=cancel`) on its model's worker; the caller
        reads `job.chunks`."""
        slot = self.slot(name)
        try:
            slot.admit()
        except ApiError:
            chunks.close()
            raise
        job = Job(asyncio.get_running_loop(), chunks, time.monotonic() + self.timeout, cancel)
        future = asyncio.get_running_loop().run_in_executor(slot.worker, job.run)
        future.add_done_callback(lambda _: setattr(slot, "held", slot.held - 1))
        return job


async def _next(job: Job, request=None) -> Any:
    """The job's next chunk; the deadline is checked at every chunk and while it waits (a fast stream never waits
    long, so a check only on waiting let it run past its timeout), and the client too when `request` is given (a
    streaming response learns of a client gone from its own failed send instead)."""
    getter = asyncio.ensure_future(job.chunks.get())
    try:
        while True:
            if time.monotonic() > job.deadline:
                job.timed_out = True
                job.cancel()
            done, _ = await asyncio.wait({getter}, timeout=0.25)
            if done:
                return getter.result()
            if request is not None and await request.is_disconnected():
                job.cancel()
    finally:
        getter.cancel()  # no-op once it has its item; a pending get takes nothing from the queue


def _failure(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, EdgeqError):
        return ApiError(400, str(exc))
    log.exception("generation failed", exc_info=exc)
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")


async def collect(job: Job, request) -> tuple[str, list, str, Any]:
    """The whole reply (text, tool calls, finish_reason, usage) of a non-streaming request."""
    text: list[str] = []
    last = ChatChunk()
    while (item := await _next(job, request)) is not None:
        if isinstance(item, BaseException):
            raise _failure(item)
        text.append(item.text)
        last = item
    if job.timed_out:
        raise ApiError(504, "the request ran past its timeout; ask for fewer tokens or raise the server's --timeout", "timeout_error", "timeout")
    return "".join(text), last.tool_calls, last.finish_reason or "stop", last.usage


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(job: Job, shape: Callable[[ChatChunk, bool], list[dict]], include_usage: Callable[[Any], dict] | None):
    """Server-sent events of a streaming request; a client that leaves cancels the generation."""
    first = True
    try:
        while (item := await _next(job)) is not None:
            if isinstance(item, BaseException):
                yield sse(_failure(item).body())
                break
            for event in shape(item, first):
                yield sse(event)
            first = False
            if item.finish_reason is not None and include_usage is not None:
                yield sse(include_usage(item.usage))
        if job.timed_out:
            yield sse(ApiError(504, "the request ran past its timeout", "timeout_error", "timeout").body())
        yield sse("[DONE]")
    finally:
        job.cancel()  # a client gone mid-stream closes this generator: stop decoding for it


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def parse_drafts(values) -> dict[str | None, str]:
    """`--draft` values: MODEL=lookup|DIR for one bundle, lookup|DIR for every bundle (a path holding "=" that exists is
    taken whole)."""
    drafts: dict[str | None, str] = {}
    for value in values:
        name, sep, what = value.partition("=")
        if sep and not Path(value).exists():
            drafts[name] = what
        else:
            drafts[None] = value
    return drafts


def load_models(bundles, *, backend: str | None = None, threads: int | None = None, n_ctx: int | None = None,
                drafts: dict[str | None, str] | None = None, draft_tokens: int | None = None) -> list[LanguageModel]:
    """Each bundle loaded (models from `edgeq.load` kept as they are), with the drafter `drafts` names for its folder
    name (the None key: every bundle without its own)."""
    from ..loading import load
    from ..speculative import DEFAULT_DRAFT_TOKENS

    drafts = dict(drafts or {})
    unknown = set(drafts) - {None} - {Path(b).name for b in bundles if not isinstance(b, LanguageModel)}
    if unknown:
        raise EdgeqError(f"--draft names {sorted(unknown)[0]!r}, which is not a served bundle's folder name; use BUNDLE=lookup|DIR")
    return [b if isinstance(b, LanguageModel) else
            load(b, backend=backend, threads=threads, n_ctx=n_ctx, draft=drafts.get(Path(b).name, drafts.get(None)),
                 draft_tokens=draft_tokens or DEFAULT_DRAFT_TOKENS) for b in bundles]


class Server:
    """A server running in this process (from `edgeq.serve(..., block=False)`): `url`, `stop()`, or `with`."""

    def __init__(self, app, sock: socket.socket, log_level: str = "warning"):
        import uvicorn

        self.sock = sock
        self.service = app.state.service  # the served models and their queues
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off"))
        self._thread: threading.Thread | None = None

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="edgeq-serve")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise EdgeqError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def run(self) -> None:
        self._server.run(sockets=[self.sock])

    def wait(self) -> None:
        """Blocks until the server stops (Ctrl-C reaches the caller, which then calls `stop()`)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EdgeqError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None
    sock.listen(128)
    return sock


def serve(bundles, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, queue_size: int = 8,
          timeout: float = 600.0, backend: str | None = None, threads: int | None = None, n_ctx: int | None = None,
          block: bool = True, log_level: str = "info", drafts: dict[str | None, str] | None = None,
          draft_tokens: int | None = None) -> Server | None:
    """Serves bundles (paths, or models from `edgeq.load`) with an OpenAI-compatible API.

    `block=False` returns a started `Server` (its `url`; `stop()` or a `with` block ends it), for tests and
    apps; port 0 picks a free port. `queue_size` requests may wait per model; `timeout` seconds bound each.
    `drafts` maps a bundle's folder name (None: every bundle) to its drafter for speculative decoding ("lookup" or a
    draft bundle); a request's `"speculative": false` turns it off, its `prediction` drafts by prompt lookup.
    """
    try:
        from .api import create_app
    except ImportError:
        raise EdgeqError(INSTALL_HINT) from None
    if isinstance(bundles, (str, Path, LanguageModel)):
        bundles = [bundles]
    if not bundles:
        raise EdgeqError("serve needs at least one bundle")
    if queue_size < 0 or timeout <= 0:
        raise EdgeqError(f"queue_size must be ≥ 0 and timeout > 0, got {queue_size} and {timeout}")
    models = load_models(bundles, backend=backend, threads=threads, n_ctx=n_ctx, drafts=drafts, draft_tokens=draft_tokens)
    app = create_app(models, api_key=api_key, queue_size=queue_size, timeout=timeout)
    server = Server(app, bind(host, port), log_level)
    if not block:
        return server.start()
    server.run()
    return None
