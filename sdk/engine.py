"""The seam every runtime implements: token ids in, logits out.

edgeq itself owns tokenization, chat templates, sampling, stop handling and text decoding
(see `generate.py`), so a backend stays a thin module and every backend sees the same ids.

Every engine keeps one cached sequence and says which ids it holds (`tokens`), and can cut it
back to a prefix (`truncate`): a chat's next turn starts with the previous turn's prompt and
reply, so `generate()` prefills only what follows the longest cached prefix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


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

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position of a fresh sequence, shape (len(tokens), vocab); used by eval."""

    def close(self) -> None:
        """Frees the model."""
