"""Quality targets (`--max-kl`, `--min-retention`, `--min-agreement`) and the smallest plan predicted to meet them.

A size budget asks "the best model in N bytes"; a target asks the dual, "the fewest bytes that keep this
much". The planner's sensitivity curves give, for every budget, the plan that loses least; which budget is
the smallest that passes is found by bisection, each candidate plan judged by simulating it: the float model
with every tensor rounded as the format will round it (the precision space's round trip), scored on the
user's eval data exactly as the finished export will be. The export is then measured for real, and a miss
fails it.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import EdgeqError
from ..progress import bar
from .knapsack import Plan, plan_precisions

log = logging.getLogger(__name__)
SEARCH_STEPS = 8


@dataclass(frozen=True)
class Targets:
    max_kl: float | None = None
    min_retention: float | None = None
    min_agreement: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def check(self, has_data: bool, has_base: bool) -> None:
        if (self.min_retention is not None or self.min_agreement is not None) and not has_data:
            raise EdgeqError("--min-retention and --min-agreement are measured on your data; pass --eval-data chats.jsonl")
        if self.min_retention is not None and not has_base:
            raise EdgeqError("--min-retention needs the model before fine-tuning: export with --adapter, or pass --base DIR")
        for name, value in asdict(self).items():
            if value is not None and not (0 <= value < float("inf")) or (name != "max_kl" and value is not None and value > 1):
                raise EdgeqError(f"--{name.replace('_', '-')} {value} is out of range (max-kl ≥ 0; retention and agreement in 0..1)")

    def misses(self, measured: dict) -> list[str]:
        """What `measured` (kl, flip_retention, agreement.exact_match) fails of the targets, one phrase each."""
        out = []
        if self.max_kl is not None and measured["kl"] > self.max_kl:
            out.append(f"KL {measured['kl']:.4f} > --max-kl {self.max_kl}")
        retention = measured.get("flip_retention")
        if self.min_retention is not None and (retention is None or retention < self.min_retention):
            out.append(f"flip retention {retention if retention is None else round(retention, 4)} < --min-retention {self.min_retention}")
        agreement = (measured.get("agreement") or {}).get("exact_match")
        if self.min_agreement is not None and (agreement is None or agreement < self.min_agreement):
            out.append(f"reply agreement {agreement} < --min-agreement {self.min_agreement}")
        return out


class PlanSimulator:
    """Scores a plan without exporting it: the float model's tensors rounded in place as the plan says.

    The fine-tune's own log-probabilities (and the base model's top-1 and shift, when known) are computed
    once; each plan then costs the round trips of the tensors whose precision changed and one pass over
    the data. The model's weights are restored by `close()`.
    """

    def __init__(self, model, space, importance: dict, data, base=None, replies=None, reply_tokens: int = 48):
        """`replies`: a LanguageModel over this same model, when greedy-reply agreement is a target."""
        import torch

        self.model, self.space, self.importance, self.data = model, space, importance, data
        self.replies, self.reply_tokens = replies, reply_tokens
        self.prompts = [replies.tokenizer.encode_chat(s.prompt) for s in data.samples if s.prompt][:16] if replies else []
        self.want = [replies.generate_ids(ids, reply_tokens) for ids in self.prompts]
        self.original = {}
        self.current: dict[str, str] = {}
        self.ref = [self._logprobs(s) for s in data.samples]
        self.ref_top = torch.cat([r.argmax(-1) for r in self.ref]).numpy()
        self.base_top, self.shift = (base.top if base is not None else None), None
        if base is not None:
            rows = torch.cat(self.ref)
            before = torch.from_numpy(np.asarray(base.logprobs))
            self.shift = float((rows.exp() * (rows - before)).sum(-1).mean())

    def _logprobs(self, sample):
        import torch

        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([sample.ids]), use_cache=False).logits[0].float()
        mask = torch.from_numpy(np.append(sample.targets, False))
        return torch.log_softmax(logits, -1)[mask]

    def apply(self, plan: Plan) -> None:
        import torch

        for entry in plan.entries:
            if self.current.get(entry.tensor) == entry.precision:
                continue
            param = self.model.get_parameter(entry.tensor)
            if entry.tensor not in self.original:
                self.original[entry.tensor] = param.data.clone()
            weight = self.original[entry.tensor].float().numpy()
            importance = None if "embed" in entry.tensor else self.importance.get(entry.tensor)
            param.data = torch.from_numpy(self.space.round_trip(weight, entry.precision, importance)).to(param.dtype)
            self.current[entry.tensor] = entry.precision

    def measure(self, plan: Plan) -> dict:
        import torch

        self.apply(plan)
        kl, tops = 0.0, []
        for sample, ref in zip(self.data.samples, self.ref):
            got = self._logprobs(sample)
            kl += float((ref.exp() * (ref - got)).sum(-1).double().sum())
            tops.append(got.argmax(-1))
        top = torch.cat(tops).numpy()
        out = {"kl": kl / len(top), "top1": float((top == self.ref_top).mean())}
        if self.base_top is not None:
            flips = self.ref_top != self.base_top
            out["flip_retention"] = float((top[flips] == self.ref_top[flips]).mean()) if flips.any() else None
            out["noise_to_shift"] = out["kl"] / self.shift if self.shift else None
        if self.prompts:
            same = sum(self.replies.generate_ids(ids, self.reply_tokens) == want for ids, want in zip(self.prompts, self.want))
            out["agreement"] = {"exact_match": same / len(self.prompts)}
        return out

    def close(self) -> None:
        for name, weight in self.original.items():
            self.model.get_parameter(name).data = weight
        self.original.clear()
        self.current.clear()


def smallest_passing_plan(sensitivity, targets: Targets, simulate, *, cap: int | None = None, margin: dict | None = None,
                          progress: bool | None = None) -> tuple[Plan, dict]:
    """The smallest plan whose simulated metrics meet `targets` (with `margin` added to each), by bisection
    over the budget between the smallest and the largest plan (or `cap`, the device's memory)."""
    hulls = [sorted(o["bytes"] for o in info["options"].values()) for info in sensitivity.tensors.values()]
    low = sensitivity.fixed_bytes + sum(h[0] for h in hulls)
    high = sensitivity.fixed_bytes + sum(h[-1] for h in hulls)
    if cap is not None:
        high = min(high, cap)
    strict = _with_margin(targets, margin or {})
    best = plan_precisions(sensitivity, high)
    best_metrics = simulate(best)
    if strict.misses(best_metrics):
        raise EdgeqError(f"no plan within {high / 2**20:.1f} MiB is predicted to meet {', '.join(strict.misses(best_metrics))}; "
                         "relax the target or allow a larger size")
    with bar(SEARCH_STEPS, "plan: search for the target", "plan", progress) as pbar:
        for _ in range(SEARCH_STEPS):
            mid = (low + high) // 2
            plan = plan_precisions(sensitivity, mid)
            metrics = simulate(plan)
            if strict.misses(metrics):
                low = mid
            else:
                high, best, best_metrics = mid, plan, metrics
            pbar.update(1)
            if high - low < 0.01 * high:
                break
    return best, best_metrics


def _with_margin(targets: Targets, margin: dict) -> Targets:
    """Targets tightened by a measured gap between the simulation and the real export."""
    return Targets(
        max_kl=None if targets.max_kl is None else max(targets.max_kl - margin.get("kl", 0.0), 0.0),
        min_retention=None if targets.min_retention is None else min(targets.min_retention + margin.get("flip_retention", 0.0), 1.0),
        min_agreement=None if targets.min_agreement is None else min(targets.min_agreement + margin.get("exact_match", 0.0), 1.0),
    )
