"""How deep to speculate: the depth with the most expected tokens per unit of time, from measured costs and acceptance.

A verification pass of w tokens is cheap where decode is bound by memory bandwidth (a phone: about one step) and dear
where it is bound by compute (this 2-core CPU: a pass of 7 costs 2-3 steps), and a draft model's guesses cost steps of
their own. So nothing about a pass is assumed: the policy times single decode steps, verification passes of each width
and the drafter's time per drafted token, and keeps the fastest seen of each (on a shared machine noise only adds,
and a step and a pass are kept the same way, so their ratio holds). A width timed fewer than `SURE` times is priced
no dearer than the width below it: tried where it looks best, it gets measured, and its cost decides from then on.

Acceptance is learnt per kind of draft (`Drafter.kind`): prompt lookup's guesses that continue a span whose last
guesses all held are right far more often than a fresh one-token match, and a draft model's are yet another thing.
Per kind, the chance that the j-th drafted token holds given the ones before it did is estimated position by position
(a running, decaying count), so a reply copying long spans earns a deep draft while a kind that is right once and then
drifts gets a short one. Expected tokens of a pass of depth k: 1 + Σ_{j≤k} P(the first j drafts all hold);
its cost: a verification pass of k+1 plus k drafted tokens, in steps. Depth 0 (plain decoding) wins unless some depth
beats a step by `MARGIN`.

Turning back on: a kind judged not worth drafting gets a short pass every `EXPLORE_EVERY` of its chances. When the
costs alone rule speculation out (no depth would pay even if every guess held), the interval doubles after each such
probe up to `EXPLORE_MOST`, and a draft model is not prefilled for a request, so a drafter that cannot pay here costs
almost nothing; the costs are measured again by those probes, so it turns back on if they fall.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)
DEFAULT_DRAFT_TOKENS = 8
PROBE_DEPTH = 16          # the exactness probe runs after this many tokens of context
MARGIN = 1.05             # a depth must beat plain decoding's tokens per unit of time by this much
EXPLORE_EVERY = 32        # chances of a kind judged not worth drafting between two short passes that measure it again
EXPLORE_MOST = 1024       # the longest such interval, reached by doubling while the costs alone rule speculation out
MEASURE_STEP_EVERY = 16   # with a drafter that always has guesses, one plain step every so many passes times a step
DECAY = 0.9               # weight of the past in each position's acceptance counts
PRIOR = 0.6               # chance a first drafted token holds, before any pass of its kind
PRIOR_WEIGHT = 1.0        # passes the prior counts for; a deeper position leans on the one before it as much
SURE = 2                  # passes of a width timed before its fastest is trusted (one pass may be preempted)


@dataclass
class Odds:
    """Per drafted position j: decayed counts of passes that tested it (every draft before it held) and of those
    where it held."""

    held: list[float] = field(default_factory=list)
    tested: list[float] = field(default_factory=list)
    since_probe: int = 0            # chances passed up since this kind was last drafted
    explore_every: int = EXPLORE_EVERY

    def survival(self, k: int) -> list[float]:
        """P(the first j drafts all hold) for j = 1..k; an untested position leans on the estimate before it."""
        out, previous, alive = [], PRIOR, 1.0
        for j in range(k):
            held, tested = (self.held[j], self.tested[j]) if j < len(self.held) else (0.0, 0.0)
            previous = (held + PRIOR_WEIGHT * previous) / (tested + PRIOR_WEIGHT)
            alive *= previous
            out.append(alive)
        return out

    def learn(self, drafted: int, accepted: int) -> None:
        while len(self.tested) < drafted:
            self.held.append(0.0)
            self.tested.append(0.0)
        for j in range(min(accepted + 1, drafted)):  # positions after the first miss were not tested
            self.tested[j] = DECAY * self.tested[j] + 1.0
            self.held[j] = DECAY * self.held[j] + (1.0 if j < accepted else 0.0)


@dataclass
class Speculation:
    """A model's drafter, its most drafted tokens per pass, and what it has measured on this machine: the exact
    verification width (greedy), the acceptance per kind of draft, the seconds of a step, of a verification pass of
    each width and of a drafted token."""

    drafter: object
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    exact_width: int | None = None      # measured on first greedy use
    inexact_reason: str = ""
    step_s: float | None = None         # one single decode step
    verify_s: dict[int, float] = field(default_factory=dict)  # width → seconds of verifying a pass of that many tokens
    verify_n: dict[int, int] = field(default_factory=dict)    # width → passes of it timed
    draft_s: float | None = None        # seconds the drafter takes per drafted token
    odds: dict[str, Odds] = field(default_factory=dict)
    since_step: int = 0
    fixed_depth: bool = False           # always draft as deep as allowed (to measure a drafter's acceptance, not its speed)
    paired: bool = False                # greedy steps taken as 2-row batches: the only path its batches agree with

    def widest(self, engine, greedy: bool, pairing: bool = False) -> int:
        """The most tokens one verification pass may hold: for greedy, the exactness probe's width. With `pairing`
        (the model's own drafter, which decides every greedy request's path, speculative or not), an engine whose
        batches agree with each other but not with its single steps (onnxruntime) takes greedy steps as 2-row
        batches instead (`paired_step`), the path its verification passes take."""
        if not greedy:
            return self.draft_tokens + 1
        if self.exact_width is None:
            self.exact_width, self.inexact_reason = probe_exact_width(engine, self.draft_tokens + 1)
            if self.exact_width < 2 and pairing:
                width, why = probe_exact_width(engine, self.draft_tokens + 1, paired=True)
                if width >= 2:
                    log.info("greedy steps are taken as 2-row batches for this model: %s; batches of up to %d tokens agree "
                             "with them bit for bit", self.inexact_reason, width)
                    self.exact_width, self.paired, self.inexact_reason = width, True, why
                else:
                    self.inexact_reason += f"; nor do batches agree with 2-row steps ({why})"
            if self.exact_width < 2:
                log.warning("greedy speculation is off for this model: %s", self.inexact_reason)
        return self.exact_width

    def calibrate(self, engine) -> None:
        """Times a single step and verification passes of 2 and 3 tokens on the model, before any request, and takes
        the draft model's step time (`DraftModel.step_s`): a drafter whose costs cannot pay here is then neither
        prefilled nor tried on the first request, and one that can starts from measured costs, not a guess."""
        ids = [1, 2, 3, 4, 5, 6, 7]
        engine.reset()
        engine.forward(ids[:4])
        for _ in range(SURE):
            for width in (1, 2, 3):
                engine.truncate(4)
                start = time.perf_counter()
                engine.forward(ids[4:5]) if width == 1 else engine.forward_all(ids[4:4 + width])
                seconds = time.perf_counter() - start
                if width == 1:
                    self.learn_step(seconds)
                else:
                    self.learn_pass(width, seconds)
        engine.reset()
        if getattr(self.drafter, "step_s", None) is not None:
            self.draft_s = self.drafter.step_s

    def top(self, widest: int, room: int) -> int:
        """The most tokens the next pass may draft; 0 when the next token must be a plain step (to time one)."""
        top = min(self.draft_tokens, widest - 1, room)
        if not self.fixed_depth and (self.step_s is None or self.since_step >= MEASURE_STEP_EVERY):
            return 0
        return max(top, 0)

    def verify_cost(self, width: int) -> float:
        """Seconds of verifying `width` tokens, in steps: the fastest pass of that width once `SURE` were timed, else
        no more than the price of the width below (a step for 1). Optimistic on purpose: a width's cost is learnt
        only by making passes of it. Pricing unmeasured widths off a dear measured one (on this CPU's llama.cpp a pass
        of 5 costs more than one of 7), or trusting one pass that the OS preempted on a shared machine (a pass of 4
        timed at 3.8 steps), kept the policy from ever trying the deep passes that pay; priced this way, a width is
        tried when it looks best until its cost is known, and that cost decides from then on."""
        price = 1.0
        for w in range(2, width + 1):
            if w in self.verify_s:
                seconds = self.verify_s[w] / self.step_s
                price = seconds if self.verify_n.get(w, 0) >= SURE else min(price, seconds)
        return price

    def cost(self, k: int) -> float:
        """A pass drafting k tokens, in steps: its verification and its drafting."""
        return self.verify_cost(k + 1) + k * (self.draft_s or 0.0) / self.step_s

    def rate(self, kind: str, k: int) -> float:
        """Expected tokens per step's worth of time of a pass drafting k tokens of this kind (plain decoding: 1)."""
        return (1.0 + sum(self.odds.setdefault(kind, Odds()).survival(k))) / self.cost(k)

    def can_pay(self, top: int) -> bool:
        """Whether some depth would beat plain decoding were every guess right: the costs alone decide."""
        if self.step_s is None:
            return True
        return any((k + 1) / self.cost(k) > MARGIN for k in range(1, top + 1))

    def depth(self, kind: str, top: int) -> int:
        """Tokens to draft, of at most `top` offered, for a pass of this kind: the most expected tokens per unit of
        time, 0 when plain decoding does better (with a short pass now and then to measure again)."""
        if self.fixed_depth or top < 1:
            return max(top, 0)
        odds = self.odds.setdefault(kind, Odds())
        best, gain = 0, MARGIN
        for k in range(1, top + 1):
            if (rate := self.rate(kind, k)) > gain:
                best, gain = k, rate
        if best:
            odds.since_probe, odds.explore_every = 0, EXPLORE_EVERY
            return best
        odds.since_probe += 1
        if odds.since_probe < odds.explore_every:
            return 0
        odds.since_probe = 0
        if not self.can_pay(top):  # hopeless at these costs: probe ever more rarely
            odds.explore_every = min(2 * odds.explore_every, EXPLORE_MOST)
        return min(2, top)

    def worth_preparing(self) -> bool:
        """Whether a draft model should prefill a request's prompt: not while the costs alone rule it out."""
        return self.fixed_depth or self.can_pay(max(1, min(self.draft_tokens, (self.exact_width or self.draft_tokens + 1) - 1)))

    def learn(self, kind: str, drafted: int, accepted: int, verify_seconds: float, draft_seconds: float) -> None:
        """A pass: `drafted` guesses of this kind, `accepted` of them kept."""
        self.since_step += 1
        self.odds.setdefault(kind, Odds()).learn(drafted, accepted)
        self.learn_pass(drafted + 1, verify_seconds)
        per_token = draft_seconds / drafted
        self.draft_s = per_token if self.draft_s is None else min(self.draft_s, per_token)

    def learn_pass(self, width: int, seconds: float) -> None:
        self.verify_s[width] = min(seconds, self.verify_s.get(width, seconds))
        self.verify_n[width] = self.verify_n.get(width, 0) + 1

    def learn_step(self, seconds: float) -> None:
        self.since_step = 0
        self.step_s = seconds if self.step_s is None else min(self.step_s, seconds)


def paired_step(engine, token: int) -> np.ndarray:
    """A decode step computed as a batch of 2: the previous token fed again with the new one, the second row kept.
    On onnxruntime a 1-row run takes other kernels than any wider batch (logits move by up to 0.7 on a quantized
    model, enough to flip an argmax) while batches of 2 to 64 rows agree bit for bit, so greedy steps taken this way
    are exactly what a verification pass computes; it costs 1.0-1.25 single steps on this CPU (bench/README)."""
    previous = engine.tokens[-1]
    engine.truncate(len(engine.tokens) - 1)
    return engine.forward_all([previous, token])[1]


def probe_exact_width(engine, widest: int, paired: bool = False) -> tuple[int, str]:
    """The widest batch (≤ `widest`) whose every row's logits equal, bit for bit, those of single steps (`paired`:
    steps taken as 2-row batches) over the same tokens, measured on this model (its cache is cleared). Returns
    (width, why not wider)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, engine.n_vocab, PROBE_DEPTH + widest).tolist()
    engine.reset()
    engine.forward(ids[:PROBE_DEPTH])
    step = (lambda t: paired_step(engine, t)) if paired else (lambda t: engine.forward([t]))
    singles = np.stack([np.array(step(t), dtype=np.float32) for t in ids[PROBE_DEPTH:]])
    steps = "2-row steps" if paired else "single steps"
    reason = ""
    for width in range(widest, 1, -1):
        engine.truncate(PROBE_DEPTH)
        rows = np.asarray(engine.forward_all(ids[PROBE_DEPTH:PROBE_DEPTH + width]), dtype=np.float32)
        if np.array_equal(rows, singles[:width]):
            engine.reset()
            return width, reason
        if not reason:
            reason = (f"{type(engine).__name__} computes a batch of {width} tokens differently from {width} {steps} "
                      f"(largest logit difference {np.abs(rows - singles[:width]).max():.1e})")
    engine.reset()
    return 1, reason + f"; no batch wider than 1 gives {steps}' logits, so verified greedy output could differ from plain decoding"
