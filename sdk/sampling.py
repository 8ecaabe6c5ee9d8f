"""Next-token choice from logits: greedy, or temperature / top-k / top-p with a repetition penalty."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import validate

# Each field's valid range, checked on construction: unchecked, a value outside it would change meaning silently
# (a negative temperature was greedy, a NaN top_p kept no token, a negative seed crashed numpy).
RANGES = {"temperature": validate.TEMPERATURE, "top_p": validate.TOP_P, "top_k": validate.TOP_K,
          "repetition_penalty": validate.REPETITION_PENALTY, "seed": validate.SEED}


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name, valid in RANGES.items():
            setattr(self, name, valid.check(name, getattr(self, name)))


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> int:
        p = self.params
        if p.repetition_penalty != 1.0 and seen is not None and len(seen):
            logits = logits.copy()
            picked = logits[seen]
            logits[seen] = np.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64) / p.temperature
        if 0 < p.top_k < logits.size:
            candidates = np.argpartition(-logits, p.top_k)[: p.top_k]
        else:
            candidates = np.arange(logits.size)
        order = candidates[np.argsort(-logits[candidates])]
        probs = np.exp(logits[order] - logits[order[0]])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self._rng.choice(len(order), p=probs)])
