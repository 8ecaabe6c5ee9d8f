"""`edgeq serve`'s scheduler: an OpenAI-compatible HTTP server over loaded bundles, on FastAPI and uvicorn.

Endpoints: `/v1/chat/completions` (server-sent events with `stream`, tools, tool_choice,
response_format, stop, max_tokens, temperature, top_p, seed, usage), `/v1/completions`, `/v1/models`
and `/health`. A request names its model by the bundle's folder name ("bundle:NAME" for a kept LoRA adapter).

An engine holds one sequence (and one KV cache), so each model runs one request at a time on its own
worker thread, in arrival order; the requests waiting for it form a bounded queue, and one more is
answered 429 at once rather than left to time out. Each request has a deadline, and a client that
disconnects stops its generation at the next token. Request bodies are checked by pydantic models
(`edgeq.serving.api`); anything malformed gets a 4xx in OpenAI's error shape, and no request can take the
server down. It binds 127.0.0.1 unless told otherwise (`edgeq.serving.listener`); with an API key, every /v1 request must carry it
as a bearer token.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import EdgeqError
from ..generate import ChatChunk, LanguageModel

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 4 << 20


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.retry_after = retry_after  # seconds, sent as Retry-After (a full queue's estimate of when a place frees)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Slot:
    """One served model: its worker thread (one sequence at a time) and how many requests it holds."""

    model: LanguageModel
    queue_size: int
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeq-model"))
    held: int = 0  # running + waiting
    typical_s: float = 1.0  # a request's time on the worker, averaged over the last few: what a place in the queue waits

    def admit(self) -> None:
        if self.held > self.queue_size:  # one running and queue_size waiting
            wait = max(1, math.ceil(self.typical_s))  # a place frees when the running request ends
            raise ApiError(429, f"model {self.model.name!r} is busy: {self.held - 1} requests already wait for it; retry in "
                           f"{wait} s", "rate_limit_error", "queue_full", retry_after=wait)
        self.held += 1

    def finished(self, seconds: float) -> None:
        self.held -= 1
        self.typical_s = 0.8 * self.typical_s + 0.2 * seconds


class Job:
    """A generation on a model's worker thread, handing its chunks to the event loop; `cancel()` stops it
    before its next token (client gone, deadline passed): `cancelled` is the event the generation checks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, chunks: Iterator[ChatChunk], deadline: float, cancelled: threading.Event):
        self.loop, self.source, self.deadline, self.cancelled = loop, chunks, deadline, cancelled
        self.chunks: asyncio.Queue = asyncio.Queue()
        self.timed_out = False
        self.started: float | None = None  # when the worker took it up

    def cancel(self) -> None:
        self.cancelled.set()

    def run(self) -> None:
        """Runs on the worker thread; ends with None on the queue (or the exception that stopped it)."""
        outcome: Any = None
        self.started = time.monotonic()
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

    async def run(self, name: str, chunks: Iterator[ChatChunk], cancel: threading.Event, request=None) -> Job:
        """Queues a generation (not started yet, made with `cancel=cancel`) on its model's worker; the caller
        reads `job.chunks`. With `request`, the job is cancelled the moment its client goes."""
        slot = self.slot(name)
        try:
            slot.admit()
        except ApiError:
            chunks.close()
            raise
        job = Job(asyncio.get_running_loop(), chunks, time.monotonic() + self.timeout, cancel)
        watcher = asyncio.ensure_future(_cancel_when_gone(job, request)) if request is not None else None
        future = asyncio.get_running_loop().run_in_executor(slot.worker, job.run)

        def done(_):
            slot.finished(time.monotonic() - (job.started or time.monotonic()))  # its time on the worker, not in the queue
            if watcher is not None:
                watcher.cancel()

        future.add_done_callback(done)
        return job


async def _cancel_when_gone(job: Job, request) -> None:
    """The server learns of a closed connection at once (uvicorn answers `receive()` with http.disconnect), but a
    stream only when a later token fails to send and a whole reply not before it is done: cancelling here frees
    the model after the token being decoded."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


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
