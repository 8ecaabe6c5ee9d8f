"""Quality against the torch reference on the same tokens: mean KL divergence, top-1 agreement, perplexity."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .engine import Engine
from .progress import bar

DEFAULT_TEXT = Path(__file__).with_name("eval_text.txt")


@dataclass
class Quality:
    kl: float          # mean KL(reference ‖ candidate) per position, nats
    top1: float        # share of positions where both pick the same most likely token
    ppl: float         # candidate perplexity on the text
    ppl_ref: float     # reference perplexity on the same tokens
    tokens: int
    ctx: int
    text: str = ""

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _log_softmax(logits: np.ndarray):
    import torch  # vectorized and threaded: numpy takes ~1 s per 256 × 49k window

    return torch.log_softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=-1)


class QualityAccumulator:
    """Sums per-position statistics over windows; `result()` averages them."""

    def __init__(self):
        self.kl = self.agree = self.nll = self.nll_ref = 0.0
        self.positions = self.predicted = 0

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, window: list[int]) -> None:
        ref, cand = _log_softmax(ref_logits), _log_softmax(logits)
        self.kl += float((ref.exp() * (ref - cand)).sum(-1).double().sum())
        self.agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.positions += len(window)
        targets = window[1:]
        rows = list(range(len(targets)))
        self.nll -= float(cand[rows, targets].sum())
        self.nll_ref -= float(ref[rows, targets].sum())
        self.predicted += len(targets)

    def result(self, ctx: int, text: str = "") -> Quality:
        return Quality(
            kl=self.kl / self.positions, top1=self.agree / self.positions,
            ppl=float(np.exp(self.nll / self.predicted)), ppl_ref=float(np.exp(self.nll_ref / self.predicted)),
            tokens=self.positions, ctx=ctx, text=text,
        )


def compare(reference: Engine, candidate: Engine, windows: list[list[int]], progress: bool | None = None, text: str = "") -> Quality:
    acc = QualityAccumulator()
    with bar(len(windows), "eval", "window", progress) as pbar:
        for window in windows:
            acc.add(reference.score(window), candidate.score(window), window)
            pbar.update(1)
    return acc.result(ctx=len(windows[0]), text=text)
