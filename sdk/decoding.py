"""The token loop under `generate()`: prefill, then one token per step, or several per verification pass when a
drafter guesses ahead (`speculative.py`); the grammar mask and the sampler choose every token the same way in both.

Prefill and history. A greedy (or seeded) request gets the same tokens whatever the engine's cache held before it:
runtimes compute a batch of tokens with other kernels than a single step (llama.cpp's quantized matmuls switch at 8
rows), so logits depend on how the positions before them were batched. A deterministic request is therefore
prefilled in chunks on fixed boundaries (multiples of `PREFILL_CHUNK` from position 0), and reuses a cached prefix
only up to a boundary below which every position was itself prefilled in such whole chunks: its keys and values are
then the bits a fresh prefill computes. A chat's earlier reply (decoded step by step) is prefilled again; that and
the rest of the last chunk are the time-to-first-token this costs (bench/README.md). Sampled requests without a seed
reuse every cached token, as before.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .sampling import Sampler, choose, verify_draft
from .speculation import paired_step

PREFILL_CHUNK = 64


@dataclass
class Turn:
    """One request's decoding state."""

    engine: object
    sampler: Sampler
    budget: int
    stop_ids: set
    stats: object
    context: list[int]                   # the prompt, then every token chosen
    matcher: object = None
    greedy: bool = False                 # argmax without a repetition penalty: the grammar mask can be skipped
    seen: set | None = None              # tokens a repetition penalty applies to
    cancel: threading.Event | None = None
    speculation: object = None           # speculative.Speculation, or None for plain decoding
    widest: int = 1                      # most tokens one verification pass may hold
    predicted: list[int] = field(default_factory=list)  # a Predicted Output's ids, for lookup drafting
    paired: bool = False                 # greedy steps as 2-row batches, the path verification takes (`paired_step`)

    def seen_ids(self) -> np.ndarray | None:
        return np.fromiter(self.seen, dtype=np.int64) if self.seen is not None else None

    def halted(self) -> str | None:
        if self.cancel is not None and self.cancel.is_set():
            return "cancelled"
        if self.matcher is not None and self.matcher.finished:
            return "stop"
        return None

    def take(self, token: int) -> None:
        if self.matcher is not None:
            self.matcher.accept(token)
        self.stats.generated_tokens += 1
        self.context.append(token)
        if self.seen is not None:
            self.seen.add(token)


class CanonicalPrefix:
    """How many leading positions of an engine's cache were prefilled in whole chunks on fixed boundaries."""

    def __init__(self):
        self._tokens, self._count = None, 0

    def count(self, engine) -> int:
        return min(self._count, len(engine.tokens)) if engine.tokens is self._tokens else 0

    def set(self, engine, count: int) -> None:
        self._tokens, self._count = engine.tokens, count


def prefill(engine, ids: list[int], canonical: CanonicalPrefix, exact: bool) -> tuple[np.ndarray, int]:
    """(logits after `ids`, how many of them the cache already held), feeding the engine only what it must."""
    keep = min(_common_prefix(engine.tokens, ids), len(ids) - 1)  # the last id is fed again for its logits
    whole = canonical.count(engine)
    if exact:
        keep = min(keep, whole) // PREFILL_CHUNK * PREFILL_CHUNK
    engine.truncate(keep)
    kept = len(engine.tokens)
    if exact and kept % PREFILL_CHUNK:  # an engine that could not cut there kept less
        engine.truncate(kept - kept % PREFILL_CHUNK)
        kept = len(engine.tokens)
    canonical.set(engine, min(whole, kept))
    try:
        if not exact:
            return engine.forward(ids[kept:]), kept
        position, logits = kept, None
        while position < len(ids):
            end = min((position // PREFILL_CHUNK + 1) * PREFILL_CHUNK, len(ids))
            logits = engine.forward(ids[position:end])
            position = end
            if end % PREFILL_CHUNK == 0:
                canonical.set(engine, end)
        return logits, kept
    except BaseException:
        engine.reset()  # an interrupted prefill leaves the cache in no state worth reusing
        raise


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def decode(turn: Turn, logits: np.ndarray, start: float) -> Iterator[int]:
    """Yields the reply's tokens from the logits after the prompt; returns the finish reason."""
    engine, stats, speculation = turn.engine, turn.stats, turn.speculation
    pending = None  # a token verification already chose (a correction), not yet fed
    decode_start = None
    while True:
        if (halt := turn.halted()) is not None:
            return halt
        token = pending if pending is not None else choose(turn.sampler, logits, turn.matcher, turn.greedy, turn.seen_ids())
        pending = None
        if decode_start is None:
            stats.time_to_first_token_s = time.perf_counter() - start
            decode_start = time.perf_counter()
        if token in turn.stop_ids:
            return "stop"
        turn.take(token)
        yield token
        room = turn.budget - stats.generated_tokens
        if room <= 0:
            return "length"
        began = time.perf_counter()  # a step's or a pass's cost includes drafting and choosing, not the caller's time
        drafts, kind = _drafts(turn, room)
        if not drafts:
            logits = paired_step(engine, token) if turn.paired else engine.forward([token])
            if speculation is not None:
                speculation.learn_step(time.perf_counter() - began)
            stats.decode_s = time.perf_counter() - decode_start
            continue
        drafted = time.perf_counter()
        rows = engine.forward_all([token] + drafts)
        accepted, outcome, away = 0, None, 0.0
        for i, draft in enumerate(drafts):
            if (outcome := turn.halted()) is not None:
                break
            kept, chosen = verify_draft(turn.sampler, rows[i], turn.matcher, turn.greedy, turn.seen_ids(), draft)
            if not kept:
                pending = chosen
                break
            accepted += 1
            if draft in turn.stop_ids:
                outcome = "stop"
                break
            turn.take(draft)
            left = time.perf_counter()
            yield draft
            away += time.perf_counter() - left
            if stats.generated_tokens >= turn.budget:
                outcome = "length"
                break
        else:
            logits = rows[len(drafts)]
        engine.truncate(len(engine.tokens) - (len(drafts) - accepted))
        stats.accepted_tokens += accepted
        stats.rejected_tokens += len(drafts) - accepted
        stats.speculative_passes += 1
        speculation.learn(kind, len(drafts), accepted, time.perf_counter() - drafted - away, drafted - began)
        stats.decode_s = time.perf_counter() - decode_start
        if outcome is not None:
            return outcome


def _drafts(turn: Turn, room: int) -> tuple[list[int], str]:
    """The next pass's guesses and their kind, cut where the grammar would refuse them. A cheap drafter (prompt
    lookup) guesses as far as allowed and the policy cuts the guess to the depth its kind earns; a draft model's depth
    is decided before it spends steps guessing."""
    speculation = turn.speculation
    if speculation is None or (top := speculation.top(turn.widest, room)) < 1:
        return [], ""
    drafter = speculation.drafter
    if drafter.cheap:
        drafts = drafter.propose(turn.context, turn.predicted, top)
        drafts = drafts[:speculation.depth(drafter.kind, len(drafts))] if drafts else []
    else:
        depth = speculation.depth(drafter.kind, top)
        drafts = drafter.propose(turn.context, turn.predicted, depth) if depth else []
    if drafts and turn.matcher is not None:
        drafts = drafts[:turn.matcher.allowed_prefix(drafts)]
    return drafts, drafter.kind
