"""Speculative decoding: cheap guesses of the next tokens, checked by the model in one forward pass.

Decode reads every weight once per token, so on a bandwidth-bound device one pass over k+1 tokens costs about one
step. A drafter guesses the next tokens (`LookupDrafter`: n-grams of the prompt, the reply so far and an OpenAI
Predicted Output; `DraftModel`: a smaller model with the same tokenizer), the model computes the logits of every
guessed position at once (`Engine.forward_all`), and edgeq's own chooser (grammar mask and sampler included) keeps
the guesses it would have picked itself. So the output does not change:
- greedy: a draft is kept exactly when `sampling.choose` picks it from logits that are bit for bit those of plain
  decoding. A batch of several tokens is computed by other kernels than a single step on most runtimes (llama.cpp's
  quantized matmuls switch kernels at 8 rows, float paths at 2), so `Speculation.exact_width` measures once per
  model how wide a verification batch may be and still give every row the bits a single step gives; greedy
  speculation never verifies more at once, and is off (with the reason logged) where no width above 1 is exact;
- sampling: speculative sampling's rule keeps the target's distribution (`Sampler.verify`);
- grammars: drafts the llguidance matcher would refuse are cut before verification, and every verified position is
  chosen under the mask as plain decoding chooses.
The depth adapts (`Speculation.depth`): the acceptance rate and the measured cost of a verification pass against a
single step (on a compute-bound CPU a pass of 5 tokens costs several steps) give the depth with the most tokens per
unit of time, or none when no depth beats plain decoding, so speculation never slows a reply for long.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import EdgeqError

log = logging.getLogger(__name__)
LOOKUP = "lookup"
DEFAULT_DRAFT_TOKENS = 8
MAX_DRAFT_TOKENS = 32
PROBE_DEPTH = 16          # the exactness probe runs after this many tokens of context
EXPLORE_EVERY = 32        # with speculation judged not worth it, one short pass every so many tokens keeps the estimates fresh
MEASURE_STEP_EVERY = 16   # with a drafter that always has guesses, one plain step every so many passes times a step
DECAY = 0.8               # weight of the past in the running acceptance rate
PRIOR_ACCEPTANCE = 0.5    # a request's acceptance rate before its first pass


def check_draft_tokens(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DRAFT_TOKENS:
        raise EdgeqError(f"draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {value!r}")
    return value


def _last_match(source: np.ndarray, key: np.ndarray, end: int) -> int | None:
    """Start of the latest occurrence of `key` lying wholly in source[:end]."""
    n = len(key)
    if end < n:
        return None
    for start in np.flatnonzero(source[:end - n + 1] == key[0])[::-1]:
        if np.array_equal(source[start:start + n], key):
            return int(start)
    return None


class LookupDrafter:
    """Prompt lookup: the reply's last n tokens (n from `longest` down to `shortest`) are looked up in a predicted text
    first, then in the prompt and the reply so far (where a lone token matches too often to guess well, so n ≥ 2);
    what followed the latest match is the guess. No second model: it pays wherever a reply copies from its input
    (edits, extraction, summaries, code)."""

    name = LOOKUP

    def __init__(self, longest: int = 4, shortest: int = 1):
        self.longest, self.shortest = longest, shortest

    def propose(self, context: Sequence[int], predicted: Sequence[int], k: int) -> list[int]:
        history = np.asarray(context, dtype=np.int64)
        guess = np.asarray(predicted, dtype=np.int64)
        for n in range(min(self.longest, len(history)), self.shortest - 1, -1):
            key = history[-n:]
            for source, end in ((guess, len(guess)), (history, len(history) - 1)):
                if source is history and n < 2:
                    continue
                start = _last_match(source, key, end)
                if start is not None and start + n < len(source):
                    return source[start + n:start + n + k].tolist()
        return []


class DraftModel:
    """A smaller model with the target's tokenizer, in any format: it decodes greedily from its own cache, which
    follows the target's context (only what changed is fed). It sees only the target's token ids, so its own chat
    template plays no part; a vocabulary that differs is refused, naming the first difference."""

    def __init__(self, draft, target):
        check_same_vocabulary(draft, target)
        self.model, self.engine = draft, draft.engine
        self.name = draft.name
        self.width = min(draft.engine.n_vocab, target.engine.n_vocab)  # ids past either model's rows are never drafted
        self.engine.forward([0, 1])  # a first batch and a first step warm the runtime (graphs, first touch of the weights),
        self.engine.forward([1])     # which a timed verification pass would otherwise pay for
        self.engine.reset()
        size, target_size = weight_bytes(draft), weight_bytes(target)
        if size and target_size and size >= target_size:
            log.warning("draft %s (%.0f MB) is not smaller than its target %s (%.0f MB): drafting costs more than it can save; "
                        "edgeq profile shows the acceptance and speed it measures", draft.name, size / 1e6, target.name, target_size / 1e6)

    def prepare(self, context: Sequence[int]) -> None:
        """Prefills the draft with a request's prompt (but its last token), once, so no verification pass pays for it."""
        if 1 < len(context) < self.engine.n_ctx:
            self._sync(context[:-1])
            if len(self.engine.tokens) < len(context) - 1:
                self.engine.forward(list(context[len(self.engine.tokens):-1]))

    def _sync(self, context: Sequence[int]) -> None:
        """Cuts the draft's cache back to its longest prefix in common with `context` (the last id always re-fed)."""
        cached = self.engine.tokens
        keep = 0
        limit = min(len(cached), len(context) - 1)
        while keep < limit and cached[keep] == context[keep]:
            keep += 1
        self.engine.truncate(keep)

    def propose(self, context: Sequence[int], predicted: Sequence[int], k: int) -> list[int]:
        engine = self.engine
        if len(context) + k > engine.n_ctx:
            return []
        self._sync(context)
        logits = engine.forward(list(context[len(engine.tokens):]))
        out = []
        while True:
            out.append(int(np.argmax(logits[:self.width])))
            if len(out) == k:
                return out
            logits = engine.forward(out[-1:])

    def close(self) -> None:
        self.model.close()


def weight_bytes(model) -> int:
    """Bytes of the weights a step reads: the bundle's model file, or an HF folder's safetensors."""
    manifest = model.manifest or {}
    if manifest.get("model_file"):
        return int(((manifest.get("files") or {}).get(manifest["model_file"]) or {}).get("bytes", 0))
    return sum(f.stat().st_size for f in Path(model.path).glob("*.safetensors")) if model.path else 0


def check_same_vocabulary(draft, target) -> None:
    """One line naming the first token the two tokenizers disagree on (or their sizes)."""
    mine, theirs = draft.tokenizer.vocabulary(), target.tokenizer.vocabulary()
    if mine == theirs:
        return
    by_id = {i: t for t, i in theirs.items()}
    for text, i in sorted(mine.items(), key=lambda item: item[1]):
        if by_id.get(i) != text:
            there = by_id.get(i)
            raise EdgeqError(f"draft {draft.name} has another vocabulary than {target.name}: token {i} is {text!r} in the draft and "
                             f"{'absent' if there is None else repr(there)} in the target ({len(mine)} vs {len(theirs)} tokens); "
                             "draft with a model of the same tokenizer")
    raise EdgeqError(f"draft {draft.name} has another vocabulary than {target.name}: {len(mine)} tokens vs {len(theirs)}; "
                     "draft with a model of the same tokenizer")


@dataclass
class Speculation:
    """A model's drafter, its most drafted tokens per pass, and what it has measured: the exact verification width
    (greedy), the acceptance rate and the cost of a pass of each width, in single decode steps."""

    drafter: object
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    exact_width: int | None = None      # measured on first greedy use
    inexact_reason: str = ""
    acceptance: float = PRIOR_ACCEPTANCE             # per drafted token, this request's; a prior its first passes replace
    step_s: float | None = None         # one single decode step
    pass_s: dict[int, float] = field(default_factory=dict)  # width → seconds of a verification pass
    since_pass: int = 0
    since_step: int = 0
    fixed_depth: bool = False           # always draft as deep as allowed (to measure a drafter's acceptance, not its speed)

    def begin(self) -> None:
        """A new request: how often guesses hold depends on its text, so the acceptance starts again from the prior;
        what a pass costs (this machine, this model) is kept."""
        self.acceptance, self.since_pass = PRIOR_ACCEPTANCE, 0

    def widest(self, engine, greedy: bool) -> int:
        """The most tokens one verification pass may hold: for greedy, the exactness probe's width."""
        if not greedy:
            return self.draft_tokens + 1
        if self.exact_width is None:
            self.exact_width, self.inexact_reason = probe_exact_width(engine, self.draft_tokens + 1)
            if self.exact_width < 2:
                log.warning("greedy speculation is off for this model: %s", self.inexact_reason)
        return self.exact_width

    def cost(self, width: int) -> float:
        """A verification pass of `width` tokens (drafting them included) in single steps: measured, else interpolated,
        else a guess."""
        if width in self.pass_s:
            return self.pass_s[width] / self.step_s
        known = sorted(self.pass_s)
        if not known:
            return 1.0 + 0.1 * (width - 1)
        below = max((w for w in known if w < width), default=None)
        above = min((w for w in known if w > width), default=None)
        if below is None or above is None:  # extrapolate linearly through (1, 1) and the nearest measured width
            w = below or above
            slope = (self.pass_s[w] / self.step_s - 1.0) / (w - 1)
            return 1.0 + slope * (width - 1)
        t = (width - below) / (above - below)
        return ((1 - t) * self.pass_s[below] + t * self.pass_s[above]) / self.step_s

    def depth(self, widest: int, room: int) -> int:
        """Drafted tokens for the next pass: the depth with the most expected tokens per unit of time, 0 when none
        beats a single step (with a short pass now and then to measure again)."""
        top = min(self.draft_tokens, widest - 1, room)
        if self.fixed_depth or top < 1:
            return max(top, 0)
        if self.step_s is None or self.since_step >= MEASURE_STEP_EVERY:
            return 0  # a plain step: every cost is relative to one, measured here and now
        a = min(self.acceptance, 0.999)
        best, gain = 0, 1.0
        for k in range(1, top + 1):
            tokens = (1 - a ** (k + 1)) / (1 - a)
            rate = tokens / self.cost(k + 1)
            if rate > gain * 1.02:
                best, gain = k, rate
        if best == 0 and self.since_pass >= EXPLORE_EVERY:
            return min(2, top)
        return best

    def learn(self, drafted: int, accepted: int, width: int, seconds: float) -> None:
        self.since_pass = 0
        self.since_step += 1
        hits, trials = accepted, accepted + (1 if accepted < drafted else 0)
        if trials:
            self.acceptance = DECAY * self.acceptance + (1 - DECAY) * hits / trials
        # the fastest seen: on a shared machine timing noise only adds (another job, a first touch of the weights), and
        # steps are kept the same way, so their ratio holds
        self.pass_s[width] = min(seconds, self.pass_s.get(width, seconds))

    def learn_step(self, seconds: float) -> None:
        self.since_pass += 1
        self.since_step = 0
        self.step_s = seconds if self.step_s is None else min(self.step_s, seconds)


def probe_exact_width(engine, widest: int) -> tuple[int, str]:
    """The widest batch (≤ `widest`) whose every row's logits equal, bit for bit, those of single steps over the same
    tokens, measured on this model (its cache is cleared). Returns (width, why not wider)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, engine.n_vocab, PROBE_DEPTH + widest).tolist()
    engine.reset()
    engine.forward(ids[:PROBE_DEPTH])
    singles = np.stack([np.array(engine.forward([t]), dtype=np.float32) for t in ids[PROBE_DEPTH:]])
    reason = ""
    for width in range(widest, 1, -1):
        engine.truncate(PROBE_DEPTH)
        rows = np.asarray(engine.forward_all(ids[PROBE_DEPTH:PROBE_DEPTH + width]), dtype=np.float32)
        if np.array_equal(rows, singles[:width]):
            engine.reset()
            return width, reason
        if not reason:
            reason = (f"{type(engine).__name__} computes a batch of {width} tokens differently from {width} single steps "
                      f"(largest logit difference {np.abs(rows - singles[:width]).max():.1e})")
    engine.reset()
    return 1, reason + "; no batch wider than 1 gives single steps' logits, so verified greedy output could differ from plain decoding"
