"""The one `generate()` every backend shares: prompt → ids → engine → sampler → text."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .engine import Engine
from .errors import EdgeqError
from .sampling import Sampler, SamplingParams
from .tokenizer import ChatTokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.time_to_first_token_s if self.time_to_first_token_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first generated token comes out of prefill; the rest each cost one decode step.
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s else 0.0


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest


class LanguageModel:
    """A loaded model: what `edgeq.load()` returns."""

    def __init__(self, engine: Engine, tokenizer: ChatTokenizer, manifest: dict | None = None, path: Path | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.manifest = manifest or {}
        self.path = path
        self.stats = GenerationStats()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        stop: Sequence[str] | str = (),
        seed: int | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Generates a reply to a prompt or a chat; `stream=True` yields text pieces as they come."""
        ids = self.tokenizer.prompt_ids(prompt, messages)
        stops = [stop] if isinstance(stop, str) else list(stop)
        params = SamplingParams(temperature, top_p, top_k, repetition_penalty, seed)
        pieces = self._pieces(ids, max_new_tokens, params, stops)
        return pieces if stream else "".join(pieces)

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int, params: SamplingParams | None = None) -> list[int]:
        """Token ids only (no detokenization, no stop strings): for comparing backends exactly."""
        return list(self._tokens(list(prompt_ids), max_new_tokens, params or SamplingParams()))

    def _tokens(self, ids: list[int], max_new_tokens: int, params: SamplingParams) -> Iterator[int]:
        engine = self.engine
        if len(ids) >= engine.n_ctx:
            raise EdgeqError(f"the prompt has {len(ids)} tokens but the context holds {engine.n_ctx}; shorten it or load with a larger n_ctx")
        max_new_tokens = min(max_new_tokens, engine.n_ctx - len(ids))
        sampler = Sampler(params)
        stop_ids = set(self.tokenizer.spec.stop_token_ids)
        penalize = params.repetition_penalty != 1.0
        seen = set(ids) if penalize else set()
        self.stats = stats = GenerationStats(prompt_tokens=len(ids))
        start = time.perf_counter()
        engine.reset()
        logits = engine.forward(ids)
        for step in range(max_new_tokens):
            token = sampler(logits, np.fromiter(seen, dtype=np.int64) if penalize else None)
            if step == 0:
                stats.time_to_first_token_s = time.perf_counter() - start
                decode_start = time.perf_counter()
            if token in stop_ids:
                break
            stats.generated_tokens += 1
            yield token
            if step + 1 == max_new_tokens:
                break
            if penalize:
                seen.add(token)
            logits = engine.forward([token])
            stats.decode_s = time.perf_counter() - decode_start

    def _pieces(self, ids: list[int], max_new_tokens: int, params: SamplingParams, stops: list[str]) -> Iterator[str]:
        detokenizer = self.tokenizer.detokenizer()
        pending = ""
        for token in self._tokens(ids, max_new_tokens, params):
            pending += detokenizer.push(token)
            if stops:
                hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
                if hits:
                    yield pending[: min(hits)]
                    return
                keep = _held_back(pending, stops)
                ready, pending = pending[: len(pending) - keep], pending[len(pending) - keep:]
            else:
                ready, pending = pending, ""
            if ready:
                yield ready
        pending += detokenizer.flush()
        if stops:
            hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
            pending = pending[: min(hits)] if hits else pending
        if pending:
            yield pending

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
