"""The release report: `report.json`, a static `report.html` (a table and a size × quality × estimated
speed chart per device, inline SVG), and the text table the CLI prints.

Speeds are a roofline estimate from the bundle's manifest and the device profile, not a measurement
(the device is not here): decode reads every weight and the KV cache once per token, so it cannot beat
bandwidth ÷ bytes per token; the first token needs 2 × weights × prompt FLOPs at the profile's peak
GFLOPS. `edgeq profile --device` calibrates the same numbers by a measured run where one is wanted.
"""
from __future__ import annotations

import hashlib
import html
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgeqError
from ..profile_report import MB, fmt_num, require_matplotlib, text_rows
from .file import STATE

PROMPT_TOKENS = 64   # the shortest prompt `edgeq profile` times by default
GEN_TOKENS = 128     # and the tokens it decodes after it
ESTIMATE_NOTE = (f"Estimated, not measured: a roofline from the manifest and the device profile. Decode tok/s = "
                 f"bandwidth ÷ bytes read per token (all weights + the KV cache at {PROMPT_TOKENS} + {GEN_TOKENS // 2} tokens); "
                 f"TTFT = 2 × weights × {PROMPT_TOKENS} prompt tokens ÷ the profile's peak GFLOPS. Real runtimes reach a "
                 f"fraction of both: treat them as upper bounds, comparable across cells.")
STATUS_TEXT = {"pass": "pass", "miss": "missed target", "error": "failed"}


def roofline(bundle: Path, profile) -> dict:
    """The cell's estimate on its device: `edgeq.profiling.device_roofline` at the prompt and reply lengths
    `edgeq profile` times by default."""
    from ..profiling import device_roofline

    return device_roofline(bundle, profile, PROMPT_TOKENS, GEN_TOKENS)


@dataclass
class ReleaseResult:
    """What `edgeq.release()` returns: the report (as written to report.json) and where it is."""
    report: dict
    json_path: Path
    html_path: Path

    @property
    def cells(self) -> list[dict]:
        return self.report["cells"]

    @property
    def ok(self) -> bool:
        return all(c["status"] == "pass" for c in self.cells)

    def failures(self) -> list[dict]:
        return [c for c in self.cells if c["status"] != "pass"]

    def table(self) -> str:
        return table(self.report)


def build_report(graph, executor: dict, started: float) -> dict:
    cells = []
    for cell in graph.cells:
        result = dict(cell.result or {"status": "error", "error": "not run (the release was interrupted)"})
        result.pop("task", None)
        cells.append({"model": cell.model, "device": cell.device, "key": cell.key, "reused": bool(result.pop("reused", False)),
                      "changed": cell.changed, **result})
    counts = {s: sum(c["status"] == s for c in cells) for s in STATUS_TEXT}
    from .. import __version__

    return {"release": str(graph.release.source), "output": str(graph.output), "edgeq_version": __version__,
            "executor": executor, "started": started, "seconds": round(time.time() - started, 3),
            "summary": {"cells": len(cells), **counts, "reused": sum(c["reused"] for c in cells)},
            "estimate_note": ESTIMATE_NOTE, "cells": cells, "tasks": graph.log}


def write_report(report: dict, output: Path) -> ReleaseResult:
    json_path, html_path = output / "report.json", output / "report.html"
    _write(json_path, json.dumps(report, indent=2) + "\n")
    _write(html_path, render_html(report, cached_chart(report, output)))
    return ReleaseResult(report, json_path, html_path)


def cached_chart(report: dict, output: Path) -> str:
    """The chart, drawn again only when what it shows changed: drawing it (and importing matplotlib) would
    otherwise be most of a second run's time."""
    shown = [{k: c.get(k) for k in ("model", "device", "status", "precision", "planned", "size_bytes", "quality", "finetune_quality", "estimate")}
             for c in report["cells"]]
    key = hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()[:16]
    path = output / STATE / f"chart-{key}.svg"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    svg = chart_svg(report)
    for old in path.parent.glob("chart-*.svg"):
        old.unlink(missing_ok=True)
    _write(path, svg)
    return svg


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def judged(cell: dict) -> dict:
    """The measurement a cell is judged by: on the release's eval data when it has some, else the built-in sample."""
    return cell.get("finetune_quality") or cell.get("quality") or {}


def _quality(cell: dict) -> str:
    q = judged(cell)
    if "kl" not in q:
        return "-"
    parts = [f"KL {q['kl']:.4f}"]
    if q.get("flip_retention") is not None:
        parts.append(f"retention {q['flip_retention']:.3f}")
    if (q.get("agreement") or {}).get("exact_match") is not None:
        parts.append(f"agreement {q['agreement']['exact_match']:.2f}")
    return ", ".join(parts)


def _target(cell: dict) -> str:
    names = {"max_kl": "KL ≤", "min_retention": "retention ≥", "min_agreement": "agreement ≥"}
    return ", ".join(f"{names[k]} {v:g}" for k, v in (cell.get("target") or {}).items()) or "-"


def _estimate(cell: dict, key: str, scale: float = 1.0) -> str:
    value = (cell.get("estimate") or {}).get(key)
    return "-" if value is None else fmt_num(value * scale)


def _precision(cell: dict) -> str:
    if not cell.get("precision"):
        return "-"
    bits = f", {cell['bits_per_weight']:g} bits/w" if cell.get("bits_per_weight") else ""
    return ("planned" if cell.get("planned") else cell["precision"]) + bits


def _status(cell: dict) -> str:
    why = " (reused)" if cell["reused"] else f" (rebuilt: {', '.join(cell['changed'])} changed)" if cell["changed"] else ""
    return STATUS_TEXT[cell["status"]] + why


def _why(cell: dict) -> list[str]:
    """Why a cell did not pass: its error, or the targets it missed."""
    return [cell["error"]] if cell.get("error") else list(cell.get("misses") or [])


def _size(cell: dict) -> str:
    return "-" if cell.get("size_bytes") is None else fmt_num(cell["size_bytes"] / MB)


def table(report: dict) -> str:
    rows = [[c["model"], c["device"], c.get("format") or "-", _precision(c), _size(c), _quality(c), _target(c),
             _estimate(c, "decode_tokens_per_s"), _estimate(c, "ttft_s", 1e3), _status(c)] for c in report["cells"]]
    lines = text_rows(["model", "device", "format", "precision", "size MB", "quality", "target", "est. tok/s", "est. TTFT ms", "status"], rows)
    lines += [f"{c['model']}/{c['device']}: {why}" for c in report["cells"] for why in _why(c)]
    s = report["summary"]
    lines.append(f"{s['pass']} of {s['cells']} cells passed, {s['miss']} missed their target, {s['error']} failed; "
                 f"{s['reused']} reused from the previous run; {report['seconds']:.1f} s")
    return "\n".join(lines)


def render_html(report: dict, chart: str) -> str:
    esc = html.escape
    rows = []
    for c in report["cells"]:
        status = _status(c)
        bundle = f'<a href="{esc(c["bundle"])}/edgeq.json">{esc(c["bundle"])}</a>' if c.get("bundle") else "-"
        cells = [esc(c["model"]), esc(c["device"]), bundle, esc(c.get("format") or "-"), esc(_precision(c)),
                 _size(c), esc(_quality(c)), esc(_target(c)), _estimate(c, "decode_tokens_per_s"), _estimate(c, "ttft_s", 1e3),
                 esc(status) + "".join(f'<div class="error">{esc(why)}</div>' for why in _why(c))]
        rows.append(f'<tr class="cell {c["status"]}" id="cell-{esc(c["model"])}--{esc(c["device"])}" data-model="{esc(c["model"])}" '
                    f'data-device="{esc(c["device"])}" data-status="{c["status"]}">' + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("model", "device", "bundle", "format", "precision", "size MB", "quality", "target",
                                             "est. decode tok/s", "est. TTFT ms", "status"))
    s = report["summary"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeq release: {esc(report["release"])}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
tr.pass td:last-child {{ background: #e3f5e1; }} tr.miss td:last-child {{ background: #fdf1d6; }} tr.error td:last-child {{ background: #fbe0e0; }}
.error {{ font-family: monospace; font-size: 12px; white-space: pre-wrap; max-width: 40em; }} .note {{ color: #555; max-width: 60em; }}
</style></head><body>
<h1>edgeq release</h1>
<p>{esc(report["release"])} → {esc(report["output"])}; edgeq {esc(str(report["edgeq_version"]))}; {esc(report["executor"]["kind"])} executor;
{report["seconds"]:.1f} s. <strong>{s["pass"]} of {s["cells"]} cells passed</strong>, {s["miss"]} missed their target, {s["error"]} failed,
{s["reused"]} reused from the previous run.</p>
<table id="cells"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>
<p class="note">Quality is measured at export against the original model, on the release's eval data where it has
some (else edgeq's built-in sample): mean KL divergence, and flip retention and reply agreement where the data allows.
Bundles that missed a target are not kept. {esc(ESTIMATE_NOTE)}</p>
<h2>Size × quality × estimated decode speed, per device</h2>
{chart}
</body></html>
"""


def chart_svg(report: dict) -> str:
    """One panel per device: x = size, y = estimated decode tok/s, colour = KL; misses as crosses."""
    try:
        require_matplotlib()
    except EdgeqError as exc:
        return f'<p class="note">No chart: {html.escape(str(exc))}</p>'
    from matplotlib import rc_context
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    devices = list(dict.fromkeys(c["device"] for c in report["cells"]))
    measured = [c for c in report["cells"] if c.get("estimate") and "kl" in judged(c)]
    kls = [judged(c)["kl"] for c in measured]
    colors = ScalarMappable(Normalize(0.0, max(kls) if kls and max(kls) > 0 else 1.0), "viridis")
    cols = min(3, len(devices))
    rows = -(-len(devices) // cols)
    with rc_context({"svg.fonttype": "none"}):
        fig = Figure(figsize=(4.2 * cols + 1, 3.4 * rows))
        for i, device in enumerate(devices):
            ax = fig.add_subplot(rows, cols, i + 1)
            here = [c for c in measured if c["device"] == device]
            for c in here:
                x, y = c["size_bytes"] / MB, c["estimate"]["decode_tokens_per_s"]
                color = colors.to_rgba(judged(c)["kl"])
                if c["status"] == "pass":
                    ax.scatter([x], [y], s=90, color=color, edgecolors="black", zorder=3)
                else:
                    ax.scatter([x], [y], s=90, color=color, marker="X", edgecolors="red", zorder=3)
                ax.annotate(f"{c['model']}\n{_precision(c).split(',')[0]}", (x, y), xytext=(6, 4), textcoords="offset points", fontsize=7)
            failed = sum(c["device"] == device and c["status"] == "error" for c in report["cells"])
            ax.set_title(device + (f" ({failed} failed)" if failed else ""), fontsize=10)
            ax.set_xlabel("size (MB)", fontsize=8)
            ax.set_ylabel("est. decode tok/s", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.ticklabel_format(useOffset=False, style="plain")
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.margins(0.3)
            ax.grid(alpha=0.3)
        fig.colorbar(colors, ax=fig.axes, label="KL vs original (o pass, X missed target)", shrink=0.8)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg")
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]
