"""Speculative decoding: cheap guesses of the next tokens, checked by the model in one forward pass.

Decode reads every weight once per token, so on a bandwidth-bound device one pass over k+1 tokens costs about one
step. A drafter guesses the next tokens (`LookupDrafter`: n-grams of the prompt, the reply so far and an OpenAI
Predicted Output; `DraftModel`: a smaller model with the same tokenizer), the model computes the logits of every
guessed position at once (`Engine.forward_all`), and edgeq's own chooser (grammar mask and sampler included) keeps
the guesses it would have picked itself. So the output does not change:
- greedy: a draft is kept exactly when `sampling.choose` picks it from logits that are bit for bit those of plain
  decoding. A batch of several tokens is computed by other kernels than a single step on most runtimes (llama.cpp's
  quantized matmuls switch kernels at 8 rows, float paths at 2), so `speculation.probe_exact_width` measures once per
  model how wide a verification batch may be and still give every row the bits a single step gives; greedy
  speculation never verifies more at once, and is off (with the reason logged) where no width above 1 is exact;
- sampling: speculative sampling's rule keeps the target's distribution (`Sampler.verify`);
- grammars: drafts the llguidance matcher would refuse are cut before verification, and every verified position is
  chosen under the mask as plain decoding chooses.
How deep to draft is `speculation.Speculation`'s to decide, from what passes cost here and how often each kind of
guess holds.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import EdgeqError

log = logging.getLogger(__name__)
LOOKUP = "lookup"
MAX_DRAFT_TOKENS = 32


def check_draft_tokens(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DRAFT_TOKENS:
        raise EdgeqError(f"draft_tokens must be an integer from 1 to {MAX_DRAFT_TOKENS}, got {value!r}")
    return value


def _match(source: np.ndarray, key: np.ndarray, end: int, after: int | None) -> int | None:
    """Start of an occurrence of `key` lying wholly in source[:end]: the first from `after` on, else the latest.
    A reply copies its source in order, so after a span breaks (an edited word), the next occurrence of the reply's
    end past where the copying stood is where it resumes; with no such place, the latest occurrence is."""
    n = len(key)
    if end < n:
        return None
    starts = np.flatnonzero(source[:end - n + 1] == key[0])
    if n > 1 and starts.size:
        starts = starts[(np.lib.stride_tricks.sliding_window_view(source[:end], n)[starts] == key).all(axis=1)]
    if not starts.size:
        return None
    if after is not None and starts[-1] >= after:
        return int(starts[np.searchsorted(starts, after)])
    return int(starts[-1])


class LookupDrafter:
    """Prompt lookup: no second model; it pays wherever a reply copies from its input (edits, extraction, summaries,
    code). The guess is what followed, in a predicted text (an OpenAI Predicted Output) or else in the prompt and the
    reply so far, the longest (up to `longest` tokens) and then latest match of the reply's end. Once a span is being
    copied, the next guesses continue along it, wherever else its last tokens occur, for as long as the reply keeps
    to it. Each guess says its `kind` (a span being followed, a predicted text, or a fresh match of 1, 2 or 3+
    tokens), whose acceptance the depth policy learns apart: following a span holds far more often than a lone token
    matched somewhere."""

    name = LOOKUP
    cheap = True  # guessing costs next to nothing: asked for as many as allowed, then cut to what their kind earns

    def __init__(self, longest: int = 8):
        self.longest = longest
        self.kind = "none"
        self._span: tuple[bool, int, int, int] | None = None  # (in the guess?, next index there, context length, agreed)
        self._resume: tuple[bool, int] | None = None  # where the reply last kept to a span: (in the guess?, index)

    def propose(self, context: Sequence[int], predicted: Sequence[int], k: int) -> list[int]:
        history = np.asarray(context, dtype=np.int64)
        guess = np.asarray(predicted, dtype=np.int64)
        found = self._follow(history, guess)
        if found is not None:  # the reply keeps to a span: where it stands is where copying resumes after an edit
            self._resume = found[:2]
        else:
            found = self._search(history, guess)
        if found is None:
            self._span, self.kind = None, "none"
            return []
        in_guess, at, agreed = found
        self._span, self.kind = (in_guess, at, len(history), agreed), _agreement_kind(in_guess, agreed)
        return (guess if in_guess else history)[at:at + k].tolist()

    def _follow(self, history: np.ndarray, guess: np.ndarray) -> tuple[bool, int, int] | None:
        """The span the last guesses came from, if every token since then kept to it: (in the guess?, where, how
        many tokens of the reply's end now agree with it)."""
        if self._span is None:
            return None
        in_guess, at, seen, agreed = self._span
        source = guess if in_guess else history
        new = history[seen:]
        end = at + len(new)
        if seen > len(history) or end >= (len(source) if in_guess else len(history) - len(new)):
            return None
        back = min(agreed, at, 16)  # the agreement it was read at still stands (not another request's context)
        if not np.array_equal(source[at - back:end], history[seen - back:]):
            return None
        return in_guess, end, agreed + len(new)

    def _search(self, history: np.ndarray, guess: np.ndarray) -> tuple[bool, int, int] | None:
        for n in range(min(self.longest, len(history) - 1), 0, -1):
            key = history[-n:]
            for in_guess, source, end in ((True, guess, len(guess)), (False, history, len(history) - 1)):
                after = self._resume[1] if self._resume is not None and self._resume[0] == in_guess else None
                start = _match(source, key, end, after)
                if start is not None and start + n < len(source):
                    return in_guess, start + n, n
        return None


def _agreement_kind(in_guess: bool, agreed: int) -> str:
    """A lookup guess's kind: where it comes from and how long the agreement behind it is (1, 2, 3, 4-7, 8-15, 16+)."""
    bucket = agreed if agreed < 4 else 4 if agreed < 8 else 8 if agreed < 16 else 16
    return f"{'predicted' if in_guess else 'copy'}{bucket}"


class DraftModel:
    """A smaller model with the target's tokenizer, in any format: it decodes greedily from its own cache, which
    follows the target's context (only what changed is fed). It sees only the target's token ids, so its own chat
    template plays no part; a vocabulary that differs is refused, naming the first difference."""

    kind = "model"
    cheap = False  # every guess is a step of the draft: the depth is decided before drafting

    def __init__(self, draft, target):
        check_same_vocabulary(draft, target)
        self.model, self.engine = draft, draft.engine
        self.name = draft.name
        self.width = min(draft.engine.n_vocab, target.engine.n_vocab)  # ids past either model's rows are never drafted
        self.step_s = fastest_step(self.engine)  # also warms the runtime (graphs, the weights' first touch)
        size, target_size = weight_bytes(draft), weight_bytes(target)
        if size and target_size and size >= target_size:
            target_s = fastest_step(target.engine)
            log.warning("draft %s (%.0f MB) is not smaller than its target %s (%.0f MB): measured here a draft step takes "
                        "%.1f ms and a target step %.1f ms, so a drafted token costs %.0f%% of the step it may save; the depth "
                        "turns speculation off where it cannot pay, and `edgeq profile --draft` measures the acceptance",
                        draft.name, size / 1e6, target.name, target_size / 1e6, self.step_s * 1e3, target_s * 1e3,
                        100 * self.step_s / target_s)

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


def fastest_step(engine, repeats: int = 3) -> float:
    """Seconds of the fastest of a few single decode steps after a short context (the cache is cleared after)."""
    engine.reset()
    engine.forward([1, 2, 3, 4])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        engine.forward([5])
        best = min(best, time.perf_counter() - start)
        engine.truncate(4)
    engine.reset()
    return best


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
