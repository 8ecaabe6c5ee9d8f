"""The pure solver of planning: a precision per tensor that minimizes predicted ΔKL within a byte budget.

A pure function of (sensitivity, budget): a multiple-choice knapsack, solved exactly by dynamic programming over the
bytes each tensor may take beyond its smallest precision, in `STEPS` steps of the budget (each option's extra bytes
rounded up, so the plan never exceeds it). The greedy it replaces (the upgrade buying the most ΔKL per byte, along
each tensor's convex hull) is optimal only for the relaxation: a large upgrade that did not fit when its turn came
(a tied table to Q8_0) was dropped for good, and a little more budget could halve a plan's predicted KL
(bench/README.md, "Plans priced for GPTQ").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import EdgeqError

STEPS = 1 << 16  # of the budget beyond every tensor's smallest precision: at most a step per tensor is left unspent


@dataclass
class PlanEntry:
    tensor: str
    precision: str
    bytes: int
    dkl: float


@dataclass
class Plan:
    format: str
    budget_bytes: int
    entries: list[PlanEntry] = field(default_factory=list)
    fixed_bytes: int = 0
    sensitivity: dict = field(default_factory=dict)  # how the ΔKL predictions were made (sample size, proxy check)
    kv_cache: dict | None = None  # the runtime's KV cache type chosen with the weights (edgeq.quant.kv_plan)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + sum(e.bytes for e in self.entries)

    @property
    def predicted_kl(self) -> float:
        return sum(e.dkl for e in self.entries)

    def overrides(self) -> dict[str, str]:
        return {e.tensor: e.precision for e in self.entries}

    def to_dict(self) -> dict:
        return {"format": self.format, "budget_bytes": self.budget_bytes, "total_bytes": self.total_bytes,
                "predicted_kl": self.predicted_kl, "fixed_bytes": self.fixed_bytes, "sensitivity": self.sensitivity,
                "kv_cache": self.kv_cache, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return cls(data["format"], data["budget_bytes"], [PlanEntry(**e) for e in data["entries"]], data["fixed_bytes"],
                   data.get("sensitivity", {}), data.get("kv_cache"))


def plan_precisions(sensitivity, budget_bytes: int) -> Plan:
    tensors = sensitivity.tensors
    names = list(tensors)
    options = [sorted(((p, o["bytes"], o["dkl"]) for p, o in tensors[n]["options"].items()), key=lambda x: (x[1], x[2])) for n in names]
    spent = sensitivity.fixed_bytes + sum(o[0][1] for o in options)
    if spent > budget_bytes:
        raise EdgeqError(f"even the smallest precisions need {spent / 2**20:.1f} MiB, over the budget of {budget_bytes / 2**20:.1f} MiB; "
                         "choose a device with more memory or a smaller model")
    free = budget_bytes - spent
    step = max(1, -(-free // STEPS))
    steps = free // step
    best = np.zeros(steps + 1)  # least summed ΔKL of the tensors so far within b steps of extra bytes
    chosen = np.zeros((len(names), steps + 1), dtype=np.int8)
    for t, opts in enumerate(options):
        least = opts[0][1]
        costs = [-(-(nbytes - least) // step) for _, nbytes, _ in opts]
        candidates = np.full((len(opts), steps + 1), np.inf)
        for i, ((_, _, dkl), cost) in enumerate(zip(opts, costs)):
            if cost <= steps:
                candidates[i, cost:] = best[:steps + 1 - cost] + dkl
        chosen[t] = candidates.argmin(0)
        best = candidates[chosen[t], np.arange(steps + 1)]
    level, left = {}, steps
    for t in reversed(range(len(names))):  # the choices that reached the best sum, back from the whole budget
        i = int(chosen[t, left])
        level[names[t]] = i
        left -= -(-(options[t][i][1] - options[t][0][1]) // step)
    entries = []
    for t, name in enumerate(names):
        precision, nbytes, dkl = options[t][level[name]]
        entries.append(PlanEntry(name, precision, nbytes, dkl))
        entries += [PlanEntry(follower, precision, 0, 0.0) for follower in tensors[name].get("shares", ())]  # stored as `name`
    return Plan(sensitivity.format, budget_bytes, entries, sensitivity.fixed_bytes)
