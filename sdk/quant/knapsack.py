"""The pure solver of planning: a precision per tensor that minimizes predicted ΔKL within a byte budget.

A pure function of (sensitivity, budget): every tensor starts at its smallest precision, then the
upgrade that buys the most predicted ΔKL per extra byte is taken, again and again, until the
budget is spent. Upgrades are taken along each tensor's lower convex hull of (bytes, ΔKL), which
makes the greedy choice optimal for the convex relaxation of this knapsack.
"""
from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field

from ..errors import EdgeqError


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


def _hull(options: dict) -> list[tuple[str, int, float]]:
    """(precision, bytes, dkl) on the lower convex hull, by growing bytes and falling ΔKL."""
    points = sorted(((p, o["bytes"], o["dkl"]) for p, o in options.items()), key=lambda x: (x[1], x[2]))
    hull: list[tuple[str, int, float]] = []
    for point in points:
        if hull and point[2] >= hull[-1][2]:
            continue  # more bytes, no less error: never worth it
        while len(hull) >= 2:
            (_, b0, d0), (_, b1, d1) = hull[-2], hull[-1]
            if (d0 - d1) * (point[1] - b1) <= (d1 - point[2]) * (b1 - b0):
                hull.pop()  # the middle point gains less per byte than going straight on
            else:
                break
        hull.append(point)
    return hull


def plan_precisions(sensitivity, budget_bytes: int) -> Plan:
    tensors = sensitivity.tensors
    hulls = {name: _hull(info["options"]) for name, info in tensors.items()}
    level = {name: 0 for name in tensors}
    spent = sensitivity.fixed_bytes + sum(h[0][1] for h in hulls.values())
    if spent > budget_bytes:
        raise EdgeqError(f"even the smallest precisions need {spent / 2**20:.1f} MiB, over the budget of {budget_bytes / 2**20:.1f} MiB; "
                         "choose a device with more memory or a smaller model")
    heap = []

    def push(name):
        hull, i = hulls[name], level[name]
        if i + 1 < len(hull):
            extra = hull[i + 1][1] - hull[i][1]
            gain = hull[i][2] - hull[i + 1][2]
            heapq.heappush(heap, (-gain / max(extra, 1), name, extra))

    for name in tensors:
        push(name)
    while heap:
        _, name, extra = heapq.heappop(heap)
        if spent + extra > budget_bytes:
            continue  # this upgrade does not fit; a cheaper one further down may
        spent += extra
        level[name] += 1
        push(name)
    entries = []
    for name, info in tensors.items():
        precision, nbytes, dkl = hulls[name][level[name]]
        entries.append(PlanEntry(name, precision, nbytes, dkl))
        entries += [PlanEntry(follower, precision, 0, 0.0) for follower in info.get("shares", ())]  # stored as `name`
    return Plan(sensitivity.format, budget_bytes, entries, sensitivity.fixed_bytes)
