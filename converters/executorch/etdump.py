"""An ETDump (ExecuTorch's runtime trace, written by an app that ran the bundle's `.pte` with event tracing on) as time
per layer and per operator, through ExecuTorch's own Inspector joined to the bundle's ETRecord (`etrecord.bin`).

The trace holds one timing per instruction per call of `forward`: for each operator ExecuTorch's kernels ran (an
`OPERATOR_CALL` around the kernel's own event) and for each XNNPACK delegate (a `DELEGATE_CALL` around one event per
XNNPACK operator inside it). The ETRecord maps an instruction to the graph nodes it came from and their modules, so to
a layer. XNNPACK's own events carry no such map: a delegate's time goes to the layers of the linears inside it, in
proportion to their weight bytes (what a decode step spends its time reading). An instruction whose nodes name no layer
(the attention kernel is called from the decoder, not a layer module) goes to the layer that ran just before it.
"""
from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError

OUTER = ("OPERATOR_CALL", "DELEGATE_CALL")
CALL = "Method::execute"  # the whole call, around every instruction
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _inspector(etdump: Path, etrecord: Path | None):
    from edgeq.converters.executorch.program import load_kernels

    load_kernels()  # the ETRecord's graph names the custom and quantized operators
    from executorch.devtools import Inspector

    try:
        return Inspector(etdump_path=str(etdump), etrecord=str(etrecord) if etrecord else None,
                         enable_module_hierarchy=etrecord is not None)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        why = "flatc found no ETDump flatbuffer in it" if isinstance(exc, subprocess.CalledProcessError) else first
        raise EdgeqError(f"{etdump.name} is not an ETDump ExecuTorch's Inspector can read with this bundle ({why}); "
                         "pass the .etdp file the app wrote for this bundle's model.pte") from exc


def _place(path: str) -> str | None:
    """A module path of the exported program as a row of the layer table (None: no layer of its own)."""
    found = LAYER.search(path)
    if found:
        return f"layer {int(found.group(1))}"
    return {"embed": "embedding", "head": "head"}.get(path.split(".")[0])


def _order(place: str) -> int:
    """Where a layer-table row runs in a call: the embedding first, the head last."""
    return -1 if place == "embedding" else 1 << 30 if place == "head" else int(place.split()[-1]) if place.startswith("layer") else -2


def _weight_name(path: str) -> str:
    return "lm_head.weight" if path == "head" else f"{path.removeprefix('decoder.')}.weight"


def _shares(event, tensors: dict) -> dict[str, float]:
    """How an outer event's time splits among layers: by the weight bytes of the linears among its nodes, else evenly
    among the layers its nodes name."""
    weights, named = defaultdict(float), set()
    for hierarchy in (event.module_hierarchy or {}).values():
        paths = [entry[0] for entry in (hierarchy or {}).values() if isinstance(entry, tuple) and entry[0]]
        if not paths:
            continue
        place = _place(paths[-1])
        if place is None:
            continue
        named.add(place)
        tensor = tensors.get(_weight_name(paths[-1]))
        if tensor is not None:
            weights[place] = tensor.get("bytes", 0)
    if weights:
        total = sum(weights.values())
        return {place: w / total for place, w in weights.items()}
    return {place: 1 / len(named) for place in sorted(named)}


def _operator(name: str) -> str:
    """An event's operator: XNNPACK's numbering (` #3`) and ExecuTorch's kernel prefix and `.out` overload dropped."""
    name = re.sub(r" #\d+$", "", name).removeprefix("native_call_")
    return re.sub(r"\.(out|\w+_out)$", "", name)


def read_trace(bundle: Path, manifest: dict, etdump: Path) -> dict:
    """Per call of `forward` in the trace: ms per layer (None without the bundle's ETRecord) and per operator, medians
    over the calls; the calls' own times; and which backend ran each operator."""
    info = manifest.get("executorch") or {}
    etrecord = Path(bundle) / info["etrecord"] if info.get("etrecord") and (Path(bundle) / info["etrecord"]).is_file() else None
    inspector = _inspector(Path(etdump), etrecord)
    blocks = [b for b in inspector.event_blocks if any(e.name == "DELEGATE_CALL" for e in b.events)]
    if not blocks:
        raise EdgeqError(f"{Path(etdump).name} holds no call of an XNNPACK program (no DELEGATE_CALL events); "
                         "record it while the app runs this bundle's model.pte, with event tracing on")
    events = [e for b in blocks for e in b.events if e.perf_data is not None]
    calls = min(len(e.perf_data.raw) for e in events)
    delegates = sum(e.name == "DELEGATE_CALL" for e in events)
    if info.get("xnnpack_delegates") and delegates != info["xnnpack_delegates"]:
        raise EdgeqError(f"{Path(etdump).name} was recorded from a program with {delegates} XNNPACK delegates; this bundle's "
                         f"has {info['xnnpack_delegates']}: pass the ETDump of this bundle's model.pte")
    tensors = manifest.get("tensors") or {}
    layers, operators, backends, counts = defaultdict(lambda: np.zeros(calls)), defaultdict(lambda: np.zeros(calls)), {}, defaultdict(int)
    total, whole, last = np.zeros(calls), None, "outside layers"
    for event in events:
        times = np.asarray(event.perf_data.raw[:calls], dtype=float)
        if event.name == CALL:
            whole = times
            continue
        if event.name in OUTER:
            total += times
            shares = _shares(event, tensors) if etrecord else {}
            last = max(shares, key=_order) if shares else last
            for place, share in (shares or {last: 1.0}).items():
                layers[place] += times * share
            continue
        op = _operator(event.name)
        operators[op] += times
        counts[op] += 1
        backends[op] = "XNNPACK" if event.is_delegated_op else "ExecuTorch kernels"
    total = total if whole is None else whole
    median = lambda values: round(float(np.median(values)), 4)  # noqa: E731
    return {
        "calls": calls, "call_ms": {"median": median(total), "min": round(float(total.min()), 4), "max": round(float(total.max()), 4)},
        "layers": {place: median(t) for place, t in layers.items()} if etrecord else None,
        "operators": sorted(({"operator": op, "backend": backends[op], "per_call": counts[op], "ms": median(t)}
                             for op, t in operators.items()), key=lambda row: -row["ms"]),
        "etrecord": etrecord is not None,
    }
