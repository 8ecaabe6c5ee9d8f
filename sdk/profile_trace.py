"""`edgeq profile BUNDLE --etdump FILE`: where the time of a call went on the device that recorded the trace, per layer
and per operator, beside what the device profile's memory bandwidth allows each layer (`profiling.device_roofline`).

The trace is the runtime's own (ExecuTorch's ETDump, written by an app with event tracing on); the format reads it
(`FormatSpec.read_trace`). A layer's roofline is the time its bytes take to stream at the profile's bandwidth during a
decode step: its weights, and its share of the KV cache at the profile's typical decode context. A layer far above
its roofline is compute- or overhead-bound on that device; the call's own roofline is the sum.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import registry
from .errors import EdgeqError

ROOFLINE_PROMPT, ROOFLINE_GEN = 64, 128  # the decode context the roofline prices the KV cache at (`edgeq profile`'s defaults)


@dataclass
class TraceProfile:
    bundle: str
    trace: str
    calls: int
    call_ms: dict
    operators: list[dict]
    layers: list[dict] | None              # in program order; None when the bundle has no ETRecord
    device: str | None = None
    roofline: dict | None = None           # the whole decode step on the device (`profiling.device_roofline`)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path) -> Path:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)

    def table(self) -> str:
        c = self.call_ms
        lines = [f"{self.trace} on {self.bundle}: {self.calls} calls, median {c['median']:.3f} ms (min {c['min']:.3f}, max {c['max']:.3f})"]
        if self.roofline:
            r = self.roofline
            lines.append(f"roofline on {self.device}: {1000 / r['decode_tokens_per_s']:.3f} ms per decode token "
                         f"({r['decode_bytes_per_token'] / 2**20:.1f} MiB at {r['bandwidth_gbps']} GB/s)")
        if self.layers:
            lines.append(f"\n{'layer':16s} {'ms/call':>9s} {'share':>6s} {'roofline ms':>12s} {'x roofline':>10s}")
            for row in self.layers:
                bound = row.get("roofline_ms")
                ratio = f"{row['ms'] / bound:.1f}" if bound else "-"
                lines.append(f"{row['layer']:16s} {row['ms']:9.4f} {row['share']:6.1%} {bound if bound is not None else '-':>12} {ratio:>10s}")
        lines.append(f"\n{'operator':44s} {'backend':18s} {'per call':>8s} {'ms/call':>9s} {'share':>6s}")
        for row in self.operators:
            lines.append(f"{row['operator'][:44]:44s} {row['backend']:18s} {row['per_call']:8d} {row['ms']:9.4f} {row['share']:6.1%}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def profile_trace(bundle: str | Path, etdump: str | Path, device: str | Path | None = None) -> TraceProfile:
    """Reads `etdump` (recorded while an app ran `bundle`'s model) with the bundle's own debug record; with `device`
    (or the device the bundle was exported for), each layer beside that profile's bandwidth roofline."""
    from .bundle import read_manifest
    from .devices import load_device
    from .profiling import device_roofline

    bundle, etdump = Path(bundle), Path(etdump)
    if not etdump.is_file():
        raise EdgeqError(f"{etdump} is not a file; pass the ETDump (.etdp) the app wrote")
    manifest = read_manifest(bundle)
    raw = registry.formats.get(manifest["format"]).read_trace(bundle, manifest, etdump)
    total = sum(row["ms"] for row in raw["operators"]) or 1.0
    operators = [{**row, "share": round(row["ms"] / total, 4)} for row in raw["operators"]]
    notes = ["medians over the trace's calls: a chat's calls are mostly one-token decode steps, its prefill a few"]
    profile_name = device or (manifest.get("device") or {}).get("id")
    target = load_device(profile_name) if profile_name else None
    roofline = device_roofline(bundle, target, ROOFLINE_PROMPT, ROOFLINE_GEN) if target else None
    layers = None
    if raw["layers"] is None:
        notes.append("no time per layer: the bundle has no ETRecord (etrecord.bin); re-export it with this edgeq")
    else:
        bounds = _layer_bounds(manifest, roofline) if roofline else {}
        calls = sum(raw["layers"].values()) or 1.0
        layers = [{"layer": place, "ms": ms, "share": round(ms / calls, 4), "roofline_ms": bounds.get(place)}
                  for place, ms in raw["layers"].items()]
    if target is None:
        notes.append("no roofline: pass --device (the profile of the device that recorded the trace)")
    return TraceProfile(str(bundle), etdump.name, raw["calls"], raw["call_ms"], operators, layers,
                        target.id if target else None, roofline, notes)


def _layer_bounds(manifest: dict, roofline: dict) -> dict[str, float]:
    """ms a decode step needs at the roofline's bandwidth for each layer's bytes: its weights (the embedding: the one row
    a token looks up) and an equal share of the KV cache read at the roofline's context."""
    tensors = manifest.get("tensors") or {}
    weights: dict[str, float] = {}
    for name, info in tensors.items():
        found = re.search(r"layers\.(\d+)\.", name)
        place = f"layer {int(found.group(1))}" if found else "head" if name == "lm_head.weight" else "embedding" if "embed" in name else None
        if place is not None:
            weights[place] = weights.get(place, 0) + (info["bytes"] / info["shape"][0] if place == "embedding" else info["bytes"])
    layer_names = [p for p in weights if p.startswith("layer")]
    kv = max(roofline["decode_bytes_per_token"] - sum(t["bytes"] for t in tensors.values()), 0)
    bandwidth = roofline["bandwidth_gbps"] * 1e9
    return {place: round((b + (kv / len(layer_names) if place in layer_names else 0)) / bandwidth * 1000, 4) for place, b in weights.items()}
