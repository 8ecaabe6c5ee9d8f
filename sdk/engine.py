"""The seam every runtime implements: token ids in, logits out.

edgeq itself owns tokenization, chat templates, sampling, stop handling and text decoding
(see `generate.py`), so a backend stays a thin module and every backend sees the same ids.

Every engine keeps one cached sequence and says which ids it holds (`tokens`), and can cut it
back to a prefix (`truncate`): a chat's next turn starts with the previous turn's prompt and
reply, so `generate()` prefills only what follows the longest cached prefix.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


def usable_cores() -> int:
    """CPUs this process may run on (its affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads(manifest: dict | None = None) -> int:
    """Threads an engine uses when the caller names none: the physical cores (a second hyperthread on a core
    only contends for the same memory bandwidth decode is bound by), never more than this process may use,
    and capped by the device profile a bundle was made for."""
    import psutil

    cores = min(psutil.cpu_count(logical=False) or usable_cores(), usable_cores())
    wanted = ((manifest or {}).get("device") or {}).get("threads")
    return max(1, min(wanted or cores, cores))


@runtime_checkable
class Engine(Protocol):
    n_ctx: int
    n_vocab: int
    tokens: list[int]
    """The ids whose keys and values the cache holds, in order (what `forward` has appended since `reset`)."""

    @classmethod
    def open(cls, model_path: Path, manifest: dict, *, threads: int | None = None, n_ctx: int | None = None) -> "Engine":
        """Opens the model file (or folder) a bundle's manifest names."""

    def reset(self) -> None:
        """Forgets the cached sequence."""

    def truncate(self, n: int) -> None:
        """Keeps the first `n` cached tokens and forgets the rest; `tokens` then says what was kept
        (an engine that cannot cut its cache may keep less, down to nothing)."""

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Appends `tokens` to the cached sequence; returns float32 logits of the last one, shape (vocab,)."""

    def forward_all(self, tokens: Sequence[int]) -> np.ndarray:
        """Appends `tokens` to the cached sequence, as `forward` does; returns float32 logits of every one of them,
        shape (len(tokens), vocab), from one pass over the weights where the runtime can (speculative decoding
        verifies drafted tokens this way). The rows may be a view valid until the next call."""

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position of a fresh sequence, shape (len(tokens), vocab); used by eval."""

    def close(self) -> None:
        """Frees the model."""


@runtime_checkable
class AdapterEngine(Engine, Protocol):
    """An engine that holds LoRA adapters beside one base (a bundle exported with `keep_adapters`)."""

    adapters: tuple[str, ...]
    """The names of the adapters loaded with the base."""
    adapter: str | None
    """The adapter the next tokens run with (None: the base alone)."""

    def set_adapter(self, name: str | None) -> None:
        """Switches adapter without reloading or copying the base; clears the cached sequence when it changes."""


class AdapterSwitch:
    """`set_adapter` for an `AdapterEngine`: nothing when `name` already runs; otherwise the engine's `_switch(name)`
    changes what runs (None: the base alone) and the cache, computed with the other weights, is cleared."""

    adapter: str | None = None

    def set_adapter(self, name: str | None) -> None:
        if name == self.adapter:
            return
        self._switch(name)
        self.adapter = name
        self.reset()


class ChunkedLogits:
    """`forward`, `forward_all` and `score` of an engine that runs a sequence in chunks of fixed-shape calls
    (Core ML's prefill function, ExecuTorch's method): its `_feed(tokens)` appends them and returns each chunk's
    logits, every position kept."""

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        return self._feed(tokens)[-1][-1]

    def forward_all(self, tokens: Sequence[int]) -> np.ndarray:
        return np.concatenate(self._feed(tokens))

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        self.reset()
        out = np.concatenate(self._feed(tokens))
        self.reset()
        return out


class PinnedAdapter:
    """An engine seen with one adapter always on, for code that runs engines without naming adapters (quality
    measurement): it has no `adapters` of its own, so a `LanguageModel` over it never switches."""

    def __init__(self, engine, name: str | None):
        engine.set_adapter(name)
        self.engine = engine

    def __getattr__(self, attr):
        if attr in ("adapters", "adapter", "set_adapter"):
            raise AttributeError(attr)
        return getattr(self.engine, attr)

    @property
    def tokens(self) -> list[int]:
        return self.engine.tokens

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        return self.engine.forward(tokens)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        return self.engine.score(tokens)
