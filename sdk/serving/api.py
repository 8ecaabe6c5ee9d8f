"""The OpenAI-compatible routes of `edgeq serve`: request bodies as pydantic models, responses in OpenAI's shapes.

Bodies are validated strictly (a string where a number belongs is an error, not a conversion) and every
failure, from bad JSON to a schema the constraint engine cannot compile, becomes a 4xx with OpenAI's
error body. Unknown fields are refused by name; OpenAI parameters edgeq does not implement (penalties,
logprobs, n) are accepted only at the value that changes nothing, so a client never gets a silently
different answer from the one it asked for.
"""
from __future__ import annotations

import logging
import threading
from typing import Annotated, Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EdgeqError
from ..generate import ChatChunk, LanguageModel
from .scheduler import MAX_BODY_BYTES, ApiError, Service, now, collect, new_id, stream_events
from ..validate import where

log = logging.getLogger(__name__)

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
MaxTokens = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCallIn(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def to_edgeq(self) -> dict:
        content = self.content if not isinstance(self.content, list) else "".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.content is None and not self.tool_calls:
            raise ApiError(400, f"a {self.role} message needs content", param="messages")
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return message


class Function(Strict):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: Function


class NamedFunction(Strict):
    name: str


class ToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema", "regex", "grammar"]
    json_schema: JsonSchemaSpec | None = None
    pattern: str | None = None
    grammar: str | None = None
    syntax: Literal["lark", "gbnf"] | None = None

    def to_edgeq(self) -> dict:
        out: dict[str, Any] = {"type": self.type}
        if self.json_schema is not None:
            out["json_schema"] = {"name": self.json_schema.name, "schema": self.json_schema.schema_}
        for key in ("pattern", "grammar", "syntax"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class Prediction(Strict):
    """OpenAI's Predicted Outputs: text the reply is expected to copy much of; prompt lookup drafts from it."""

    type: Literal["content"]
    content: Union[str, list[TextPart]]

    def to_edgeq(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class Common(Strict):
    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: Union[str, Annotated[list[str], Field(max_length=16)], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    frequency_penalty: Literal[0, 0.0] = 0
    presence_penalty: Literal[0, 0.0] = 0
    logprobs: Literal[False, None] = None
    response_format: ResponseFormat | None = None
    user: str | None = None  # accepted for compatibility; edgeq keeps no per-user state
    prediction: Prediction | None = None
    speculative: bool | None = None  # edgeq's own: false decodes this request one token per step

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def sampling(self) -> dict:
        return dict(temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop or [],
                    response_format=self.response_format.to_edgeq() if self.response_format else None, speculative=self.speculative,
                    prediction=self.prediction.to_edgeq() if self.prediction else None)


class ChatRequest(Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["auto", "required", "none"], ToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None


class CompletionRequest(Common):
    prompt: Union[str, Annotated[list[str], Field(min_length=1, max_length=1)]]
    max_tokens: MaxTokens | None = 16  # OpenAI's default for completions


def _max_tokens(model: LanguageModel, asked: int | None) -> int:
    """The request's max_tokens, or up to the end of the context."""
    if asked is not None and asked >= model.engine.n_ctx:
        raise ApiError(400, f"max_tokens={asked} is beyond the context of {model.engine.n_ctx} tokens (the prompt needs room too)",
                       param="max_tokens")
    return asked if asked is not None else model.engine.n_ctx - 1


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _error_response(exc: ApiError) -> JSONResponse:
    retry = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
    return JSONResponse(exc.body(), status_code=exc.status, headers=retry)


def _guard(app: FastAPI, service: Service) -> None:
    """Every failure answered in OpenAI's error shape (nothing a request sends takes the server down), the API key
    checked on /v1, and bodies over the limit refused before they are read."""
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        error = exc.errors()[0]
        # pydantic names the member of a union it tried ("str", "list[str]"); the user wrote none of them
        loc = [p for p in error.get("loc", ()) if p != "body" and not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
        field = where(loc) or None
        message = error.get("msg", "invalid request").removeprefix("Value error, ")
        if error.get("type") == "json_invalid":
            field, message = None, "the body is not valid JSON"
        return _error_response(ApiError(400, f"{field}: {message}" if field else message, param=field))

    @app.exception_handler(EdgeqError)
    async def edgeq_error(request: Request, exc: EdgeqError):
        return _error_response(ApiError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error_response(ApiError(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error"))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("request failed")
        return _error_response(ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            try:
                service.check_key(request.headers.get("authorization"))
            except ApiError as exc:
                return _error_response(exc)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            return _error_response(ApiError(413, f"the body is over {MAX_BODY_BYTES >> 20} MiB"))
        return await call_next(request)


def create_app(models: list[LanguageModel], *, api_key: str | None = None, queue_size: int = 8, timeout: float = 600.0) -> FastAPI:
    """The ASGI app over loaded models (what `edgeq.serve` runs; tests may drive it directly)."""
    service = Service(models, api_key, queue_size, timeout)
    app = FastAPI(title="edgeq", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    _guard(app, service)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": {name: {"waiting": max(slot.held - 1, 0), "running": min(slot.held, 1)}
                                           for name, slot in service.slots.items()}}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": service.created, "owned_by": "edgeq"}
                                           for name in service.names()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        model = service.slot(body.model).model
        messages = [m.to_edgeq() for m in body.messages]
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, ToolChoice) else body.tool_choice
        max_tokens = _max_tokens(model, body.max_completion_tokens or body.max_tokens)
        options = dict(tools=tools, tool_choice=choice, parallel_tool_calls=body.parallel_tool_calls is not False,
                       max_new_tokens=max_tokens, adapter=service.target(body.model)[1], **body.sampling())
        cancel = threading.Event()
        chunks = model.chat(messages, **options, stream=True, cancel=cancel)  # checks everything (prompt fits, schema compiles) before queueing
        job = await service.run(body.model, chunks, cancel, request)
        rid, created = new_id("chatcmpl"), now()
        base = {"id": rid, "created": created, "model": body.model, "system_fingerprint": None}
        if body.stream:
            def shape(chunk: ChatChunk, first: bool) -> list[dict]:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                events = [] if not first else [{**base, "object": "chat.completion.chunk",
                                                "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}]}]
                change: dict[str, Any] = {}
                if chunk.text:
                    change["content"] = chunk.text
                if chunk.tool_calls:
                    change["tool_calls"] = [{"index": i, **c.to_dict()} for i, c in enumerate(chunk.tool_calls)]
                if change or chunk.finish_reason:
                    events.append({**base, "object": "chat.completion.chunk",
                                   "choices": [{"index": 0, "delta": change, "finish_reason": chunk.finish_reason, "logprobs": None}]})
                return events

            usage = (lambda u: {**base, "object": "chat.completion.chunk", "choices": [], "usage": u.to_dict()}) \
                if body.stream_options and body.stream_options.include_usage else None
            return StreamingResponse(stream_events(job, shape, usage), media_type="text/event-stream")
        text, calls, finish, usage = await collect(job, request)
        message: dict[str, Any] = {"role": "assistant", "content": text if (text or not calls) else None}
        if calls:
            message["tool_calls"] = [c.to_dict() for c in calls]
        return {**base, "object": "chat.completion", "usage": usage.to_dict(),
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        model = service.slot(body.model).model
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        options = dict(max_new_tokens=_max_tokens(model, body.max_tokens), adapter=service.target(body.model)[1], **body.sampling())
        cancel = threading.Event()
        job = await service.run(body.model, model.complete(prompt, **options, stream=True, cancel=cancel), cancel, request)
        rid, created = new_id("cmpl"), now()
        base = {"id": rid, "object": "text_completion", "created": created, "model": body.model}
        if body.stream:
            def shape(chunk: ChatChunk, first: bool) -> list[dict]:
                if not chunk.text and chunk.finish_reason is None:
                    return []
                return [{**base, "choices": [{"index": 0, "text": chunk.text, "finish_reason": chunk.finish_reason, "logprobs": None}]}]

            usage = (lambda u: {**base, "choices": [], "usage": u.to_dict()}) if body.stream_options and body.stream_options.include_usage else None
            return StreamingResponse(stream_events(job, shape, usage), media_type="text/event-stream")
        text, _, finish, usage = await collect(job, request)
        return {**base, "usage": usage.to_dict(), "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    return app
