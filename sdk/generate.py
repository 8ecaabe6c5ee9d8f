"""The one generation loop every backend shares: prompt → ids → engine → (grammar mask) → sampler → text.

`LanguageModel`, what `edgeq.load()` returns, has three ways in:
- `generate(prompt | messages=...)`: the reply as a str, or its text pieces with `stream=True`;
- `chat(messages, tools=, tool_choice=, response_format=)`: a `ChatResult` (text, tool_calls,
  finish_reason, usage), or `ChatChunk`s with `stream=True`; what apps and `edgeq serve` use;
- `complete(prompt)`: a `ChatResult` for a plain prompt (the server's /v1/completions).
`response_format` (a JSON schema, any JSON object, a regex, a Lark or GBNF grammar) works in all three:
tokens that would break it are masked before sampling (`constrain.py`).

Every call reuses the engine's cache: when the prompt starts with ids the cache already holds (the last
turn's prompt and reply, in a chat), only the rest is prefilled, so a chat's time to first token follows
the new message, not the length of the conversation.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence


from .constrain import Constraint, Vocabulary, response_format_grammar
from .decoding import CanonicalPrefix, Turn, decode, prefill
from .engine import Engine
from .errors import EdgeqError
from .sampling import Sampler, SamplingParams
from .speculation import DEFAULT_DRAFT_TOKENS, Speculation
from .speculative import LOOKUP, LookupDrafter
from .tokenizer import ChatTokenizer
from .usage import GenerationStats, Usage
from .tools import ToolCall, ToolFormat, check_choice, check_tools, history_for_template, tool_format
from .validate import check_generate_args, check_stops

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class ChatResult:
    """A whole reply: `finish_reason` is "stop" (stop token, stop string or complete grammar), "length"
    (max_new_tokens or the context ran out) or "tool_calls"."""

    text: str
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: Usage

    def message(self) -> dict:
        """The assistant message to append to the history for the next turn (OpenAI's shape)."""
        message = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            message["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        return message


@dataclass
class ChatChunk:
    """A piece of a streamed reply; the last one has the tool calls, finish_reason and usage."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class _Request:
    ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    stops: list[str] = field(default_factory=list)
    constraint: Constraint | None = None
    tool_format: ToolFormat | None = None
    finish_reason: str = "length"
    adapter: str | None = None  # the bundle's LoRA adapter to run with (None: the base)
    cancel: threading.Event | None = None  # set: stop before the next token (finish_reason "cancelled")
    speculative: bool | None = None  # None: speculate when a drafter is loaded (or a prediction is given)
    predicted: list[int] = field(default_factory=list)  # a Predicted Output's ids: prompt lookup drafts from them


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest


class _Text:
    """The reply's text so far; releases what no stop string and no tool call can still claim."""

    def __init__(self, stops: list[str], call_start=None):
        self.stops, self.call_start = stops, call_start
        self.raw, self.sent, self.stopped = "", 0, False

    def push(self, piece: str) -> str:
        self.raw += piece
        hits = [i for i in (self.raw.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.raw, self.stopped = self.raw[: min(hits)], True
        ready = len(self.raw) - (0 if self.stopped else _held_back(self.raw, self.stops))
        if self.call_start is not None and (start := self.call_start(self.raw)) is not None:
            ready = min(ready, start)
        out = self.raw[self.sent:ready]
        self.sent = max(self.sent, ready)
        return out


def _collect(chunks: Iterator[ChatChunk]) -> ChatResult:
    text, last = [], ChatChunk()
    for chunk in chunks:
        text.append(chunk.text)
        last = chunk
    return ChatResult("".join(text), last.tool_calls, last.finish_reason or "stop", last.usage or Usage(0, 0))


class LanguageModel:
    """A loaded model: what `edgeq.load()` returns."""

    def __init__(self, engine: Engine, tokenizer: ChatTokenizer, manifest: dict | None = None, path: Path | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.manifest = manifest or {}
        self.path = path
        self.stats = GenerationStats()
        self._vocabulary: Vocabulary | None = None
        self.speculation: Speculation | None = None  # the drafter `edgeq.load(draft=...)` attached
        self._prediction_lookup: Speculation | None = None
        self._canonical = CanonicalPrefix()

    @property
    def name(self) -> str:
        """The bundle's folder name (what `edgeq serve` calls the model)."""
        return Path(self.path).name if self.path else "model"

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None, stream: bool = False,
                 **options) -> str | Iterator[str]:
        """The text of a reply to a prompt or a chat; `stream=True` yields its pieces as they come.

        The text of `complete(prompt)` (no chat template) or `chat(messages)`, so the three ways in take the same
        options and cannot drift apart: `max_new_tokens`, `temperature`, `top_p`, `top_k`, `repetition_penalty`,
        `stop`, `seed`, `response_format`, `truncate`, `adapter`, `cancel`, `speculative`, `prediction` (see `chat`). For tool calls,
        finish_reason or usage, call `chat` or `complete`.
        """
        if prompt is not None and messages is not None:
            raise EdgeqError("pass prompt= or messages=, not both")
        chunks = self.complete(prompt, stream=True, **options) if messages is None else self.chat(messages, stream=True, **options)
        pieces = (chunk.text for chunk in chunks if chunk.text)
        return pieces if stream else "".join(pieces)

    def chat(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool = True,
        response_format: dict | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] | str = (),
        seed: int | None = None,
        stream: bool = False,
        truncate: bool = False,
        adapter: str | None = None,
        cancel: threading.Event | None = None,
        speculative: bool | None = None,
        prediction: str | dict | None = None,
    ) -> ChatResult | Iterator[ChatChunk]:
        """Answers a chat as OpenAI's chat completions do: a `ChatResult`, or `ChatChunk`s with `stream=True`.

        - `tools`: OpenAI-style function specs, rendered by the model's chat template; calls come back
          parsed in `tool_calls`, their arguments valid for the function's schema. Append
          `result.message()` and `{"role": "tool", "tool_call_id": ..., "content": ...}` for the next turn.
        - `tool_choice`: "auto" (default), "required" (at least one call), "none" (tools not offered) or
          `{"type": "function", "function": {"name": ...}}` (exactly that call); `parallel_tool_calls=False`
          allows at most one call per reply.
        - `response_format`: `{"type": "json_schema", "json_schema": {"schema": {...}}}`, `{"type":
          "json_object"}`, `{"type": "regex", "pattern": ...}` or `{"type": "grammar", "syntax": "lark"
          | "gbnf", "grammar": ...}`: the reply is valid by construction (unless it runs out of tokens:
          finish_reason "length").
        - `max_new_tokens`: 256 by default, fewer when the context has less room left (an explicit value the
          context cannot hold is refused).
        - `truncate=True` drops the oldest turns of a chat that does not fit the context instead of refusing it.
        - `adapter`: one of the bundle's LoRA adapters kept apart from the base (`--keep-adapters`) to answer
          with; None answers with the base.
        - `cancel`: an event that, once set (from any thread), stops the reply before its next token with
          finish_reason "cancelled": a stop button, or the server when a client leaves.
        - `speculative`: False decodes one token per step even with a drafter loaded (`edgeq.load(draft=...)`); the
          output is the same either way (greedy token for token, sampling in distribution), only the speed differs.
        - `prediction`: text the reply is expected to copy much of (OpenAI's Predicted Outputs, a str or
          `{"type": "content", "content": ...}`): prompt lookup drafts from it.
        """
        messages = history_for_template(messages) if isinstance(messages, list) else messages
        check_generate_args(None, messages, DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens, stop)
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty, seed)
        grammar, form, offered = response_format_grammar(response_format), None, None
        if tools is not None:
            offered = check_tools(tools)
            choice = check_choice(tool_choice, offered)
            if choice == "none":
                offered = None
            elif grammar is not None:
                raise EdgeqError("response_format and tools cannot be combined; pass tool_choice=\"none\" to get formatted text")
            else:
                form = tool_format(self.tokenizer.chat_template, self.name)
                grammar = form.grammar(offered, choice, self._is_special, parallel_tool_calls)
        elif tool_choice not in (None, "none", "auto"):
            raise EdgeqError(f"tool_choice={tool_choice!r} needs tools=; pass the functions the model may call")
        ids, budget = self._prompt_ids(None, messages, max_new_tokens, truncate, offered)
        request = _Request(ids, budget, params, check_stops(stop), self._constraint(grammar), form, adapter=self.check_adapter(adapter),
                           cancel=cancel, speculative=speculative, predicted=self._predicted(prediction))
        chunks = self._reply(request)
        return chunks if stream else _collect(chunks)

    def complete(self, prompt: str, *, response_format: dict | None = None, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, stop: Sequence[str] | str = (),
                 seed: int | None = None, stream: bool = False, truncate: bool = False, adapter: str | None = None,
                 cancel: threading.Event | None = None, speculative: bool | None = None,
                 prediction: str | dict | None = None) -> ChatResult | Iterator[ChatChunk]:
        """Continues a plain prompt (no chat template): a `ChatResult`, or `ChatChunk`s with `stream=True` (options as in
        `chat`; `truncate=True` drops the prompt's oldest tokens instead)."""
        check_generate_args(prompt, None, DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens, stop)
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty, seed)
        ids, budget = self._prompt_ids(prompt, None, max_new_tokens, truncate)
        request = _Request(ids, budget, params, check_stops(stop), self._constraint(response_format_grammar(response_format)),
                           adapter=self.check_adapter(adapter), cancel=cancel, speculative=speculative, predicted=self._predicted(prediction))
        chunks = self._reply(request)
        return chunks if stream else _collect(chunks)

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int, params: SamplingParams | None = None,
                     adapter: str | None = None, speculative: bool | None = None, predicted: Sequence[int] = ()) -> list[int]:
        """Token ids only (no detokenization, no stop strings), from an empty cache: for comparing backends exactly."""
        request = _Request(list(prompt_ids), max_new_tokens, params or SamplingParams(), adapter=self.check_adapter(adapter),
                           speculative=speculative, predicted=list(predicted))
        self.engine.reset()
        return list(self._tokens(request))

    @property
    def adapters(self) -> tuple[str, ...]:
        """The LoRA adapters this model can answer with besides its base (a bundle exported with `keep_adapters`)."""
        return tuple(getattr(self.engine, "adapters", ()))

    def check_adapter(self, name: str | None) -> str | None:
        """`name` if it is one of the model's adapters (or None, the base); else one line naming what it has. Requests
        check it when they are made, and switch to it when they run."""
        if name is not None and name not in self.adapters:
            raise EdgeqError(f"adapter {name!r} is not in this model; it has {', '.join(map(repr, self.adapters)) or 'none'} "
                             "(export with --adapter NAME=DIR --keep-adapters)")
        return name

    def _use_adapter(self, name: str | None) -> None:
        """Switches the engine to the request's adapter; the engine drops its cache when it changes."""
        if getattr(self.engine, "adapter", None) != name:
            self.engine.set_adapter(name)

    # ---- internals ---------------------------------------------------------------------------------

    def _prompt_ids(self, prompt, messages, max_new_tokens: int | None, truncate: bool,
                    tools: list[dict] | None = None) -> tuple[list[int], int]:
        """The prompt's ids (its oldest part dropped if `truncate` and it does not fit) and how many tokens to generate."""
        n_ctx = self.engine.n_ctx
        if max_new_tokens is not None and max_new_tokens >= n_ctx:
            raise EdgeqError(f"max_new_tokens={max_new_tokens} is beyond the context of {n_ctx} tokens (the prompt needs room too); "
                             "lower it or load with a larger n_ctx")
        asked = min(max_new_tokens or DEFAULT_MAX_NEW_TOKENS, n_ctx - 1)
        room = n_ctx - asked  # what truncation keeps, so the whole reply fits after it
        if messages is None:
            ids = self.tokenizer.encode(prompt)
            if truncate and len(ids) > room:
                ids = ids[-room:]
        else:
            messages = list(messages)
            ids = self.tokenizer.encode_chat(messages, tools=tools)
            while truncate and len(ids) > room and (shorter := _drop_oldest_turn(messages)) is not None:
                messages = shorter
                ids = self.tokenizer.encode_chat(messages, tools=tools)
        if len(ids) >= n_ctx:
            raise EdgeqError(f"the prompt has {len(ids)} tokens but the context holds {n_ctx}; shorten it, pass truncate=True "
                             "to drop its oldest part, or load with a larger n_ctx")
        return ids, asked

    def _predicted(self, prediction: str | dict | None) -> list[int]:
        """A Predicted Output's token ids (OpenAI's `{"type": "content", "content": ...}`, or the text itself)."""
        if prediction is None:
            return []
        if isinstance(prediction, dict) and prediction.get("type") == "content":
            prediction = prediction.get("content")
            if isinstance(prediction, list):  # content parts, as OpenAI allows
                prediction = "".join(part.get("text", "") for part in prediction if isinstance(part, dict))
        if not isinstance(prediction, str):
            raise EdgeqError('prediction must be text or {"type": "content", "content": "..."}')
        return self.tokenizer.encode(prediction, add_special_tokens=False)

    def _vocab(self) -> Vocabulary:
        if self._vocabulary is None:
            self._vocabulary = Vocabulary(self.tokenizer.to_json(), self.engine.n_vocab, self.tokenizer.spec.stop_token_ids)
        return self._vocabulary

    def _constraint(self, grammar: str | None) -> Constraint | None:
        return None if grammar is None else self._vocab().compile(grammar)

    def _is_special(self, text: str) -> bool:
        return self._vocab().special_token(text, self.tokenizer.token_id(text))

    def _speculation(self, request: _Request) -> Speculation | None:
        """The drafter this request speculates with: prompt lookup over its prediction when it gives one, else the
        model's own drafter; None when asked not to."""
        if request.speculative is False:
            return None
        if request.predicted and (self.speculation is None or self.speculation.drafter.name != LOOKUP):
            if self._prediction_lookup is None:
                self._prediction_lookup = Speculation(LookupDrafter(), self.speculation.draft_tokens if self.speculation else DEFAULT_DRAFT_TOKENS)
                self._prediction_lookup.calibrate(self.engine)  # before this request's prefill: it clears the cache
            return self._prediction_lookup
        if request.speculative and self.speculation is None:
            raise EdgeqError("speculative=True needs a drafter: load with draft=\"lookup\" or draft=DRAFT_BUNDLE, or pass prediction=")
        return self.speculation

    def _tokens(self, request: _Request) -> Iterator[int]:
        engine, ids, params = self.engine, request.ids, request.params
        if len(ids) >= engine.n_ctx:
            raise EdgeqError(f"the prompt has {len(ids)} tokens but the context holds {engine.n_ctx}; shorten it or load with a larger n_ctx")
        penalize = params.repetition_penalty != 1.0
        self.stats = stats = GenerationStats(prompt_tokens=len(ids))
        turn = Turn(engine, Sampler(params), min(request.max_new_tokens, engine.n_ctx - len(ids)), set(self.tokenizer.spec.stop_token_ids),
                    stats, list(ids), request.constraint.matcher() if request.constraint else None,
                    greedy=params.temperature == 0 and not penalize, seen=set(ids) if penalize else None, cancel=request.cancel,
                    speculation=self._speculation(request), predicted=request.predicted)
        start = time.perf_counter()
        self._use_adapter(request.adapter)
        if self.speculation is not None and params.temperature == 0:  # the model's drafter sets every greedy request's
            self.speculation.widest(engine, True, pairing=True)         # path, speculative or not (may clear the cache)
            turn.paired = self.speculation.paired
        if turn.speculation is not None:
            turn.widest = turn.speculation.widest(engine, params.temperature == 0)  # may clear the cache: before prefill
        logits, stats.cached_tokens = prefill(engine, ids, self._canonical, exact=params.temperature == 0 or params.seed is not None)
        if turn.speculation is not None and hasattr(turn.speculation.drafter, "prepare") and turn.speculation.worth_preparing():
            turn.speculation.drafter.prepare(ids)  # a draft model's prompt prefill: part of the time to first token
        request.finish_reason = "length"
        request.finish_reason = yield from decode(turn, logits, start)

    def _reply(self, request: _Request) -> Iterator[ChatChunk]:
        form = request.tool_format
        text = _Text(request.stops, form.call_start if form else None)
        detokenizer = self.tokenizer.detokenizer()
        tokens = self._tokens(request)
        for token in tokens:
            piece = text.push(detokenizer.push(token))
            if piece:
                yield ChatChunk(piece)
            if text.stopped:
                request.finish_reason = "stop"
                tokens.close()
                break
        else:
            piece = text.push(detokenizer.flush())
            if piece:
                yield ChatChunk(piece)
        content, calls = form.parse(text.raw) if form else (text.raw, [])
        finish = "tool_calls" if calls and request.finish_reason == "stop" else request.finish_reason
        usage = Usage.of(self.stats)
        yield ChatChunk(content[text.sent:], calls, finish, usage)

    def close(self) -> None:
        self.engine.close()
        if self.speculation is not None and hasattr(self.speculation.drafter, "close"):
            self.speculation.drafter.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _drop_oldest_turn(messages: list[dict]) -> list[dict] | None:
    """The chat without its oldest turn (a user message and what answered it); system messages stay. None
    when only the last turn is left."""
    first = next((i for i, m in enumerate(messages) if m.get("role") != "system"), None)
    if first is None:
        return None
    following = next((i for i in range(first + 1, len(messages)) if messages[i].get("role") == "user"), None)
    return None if following is None else messages[:first] + messages[following:]
