"""Next-token choice from logits: greedy, or temperature / top-k / top-p with a repetition penalty; within a grammar's
mask when there is one (`choose`), and speculative sampling's accept-or-resample rule for a drafted token (`verify_draft`)."""
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

    def _penalized(self, logits: np.ndarray, seen: np.ndarray | None) -> np.ndarray:
        p = self.params
        if p.repetition_penalty != 1.0 and seen is not None and len(seen):
            logits = logits.copy()
            picked = logits[seen]
            logits[seen] = np.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        return logits

    def distribution(self, logits: np.ndarray, seen: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, their probabilities) that a sampled token is drawn from: most likely first (temperature > 0)."""
        p = self.params
        logits = self._penalized(logits, seen).astype(np.float64) / p.temperature
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
        return order, probs

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> int:
        if self.params.temperature <= 0:
            return int(np.argmax(self._penalized(logits, seen)))
        order, probs = self.distribution(logits, seen)
        return int(order[self._rng.choice(len(order), p=probs)])

    def verify(self, logits: np.ndarray, seen: np.ndarray | None, draft: int) -> tuple[bool, int]:
        """Speculative sampling's rule for a drafted token (a deterministic proposal): keep it with the probability
        the model gives it, else draw from the model's distribution with the draft removed. The token that comes
        out is distributed exactly as `self(logits)` is (Leviathan et al. 2023; Chen et al. 2023)."""
        order, probs = self.distribution(logits, seen)
        hit = order == draft
        if self._rng.random() < probs[hit].sum():
            return True, draft
        rest = np.where(hit, 0.0, probs)
        return False, int(order[self._rng.choice(len(order), p=rest / rest.sum())])


def choose(sampler: Sampler, logits: np.ndarray, matcher, greedy: bool, seen: np.ndarray | None) -> int:
    """The next token, within the grammar when there is one. Greedy decoding tries the plain argmax first:
    when the grammar allows it, it is the argmax of the masked logits too, and the mask (a pass over the
    whole vocabulary) is skipped, which is most steps of a JSON reply."""
    if matcher is None:
        return sampler(logits, seen)
    if greedy:
        token = int(np.argmax(logits))
        if matcher.allows(token):
            return token
    return sampler(matcher.mask(logits), seen)


def verify_draft(sampler: Sampler, logits: np.ndarray, matcher, greedy: bool, seen: np.ndarray | None, draft: int) -> tuple[bool, int]:
    """(whether `draft` is kept, the token that comes out) at one verified position: greedy keeps a draft exactly
    when `choose` would pick it, so verified output is token for token plain decoding's."""
    if greedy or sampler.params.temperature <= 0:
        token = choose(sampler, logits, matcher, greedy, seen)
        return token == draft, token
    return sampler.verify(matcher.mask(logits) if matcher is not None else logits, seen, draft)
