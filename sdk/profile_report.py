"""The result objects of `edgeq.profile()` and their renderings: a text table, a JSON file, and a PNG chart
of size × quality × decode speed."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import EdgeqError

PLOT_SIZE_PX = (1000, 640)
PLOT_DPI = 100
MB = 1e6


@dataclass(frozen=True)
class Spread:
    """Median and spread (min/max, interquartile range) of one quantity over the repeats."""
    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        v = np.asarray(values, dtype=float)
        q1, median, q3 = np.percentile(v, [25, 50, 75])
        return cls(float(median), float(v.min()), float(v.max()), float(q1), float(q3), len(v))


@dataclass
class PromptProfile:
    prompt_tokens: int
    ttft_s: Spread | None = None                # prefill of the prompt + picking the first token
    prefill_tokens_per_s: Spread | None = None
    decode_tokens_per_s: Spread | None = None   # the `gen` tokens decoded right after this prompt
    skipped: str | None = None


@dataclass
class PromptEstimate:
    prompt_tokens: int
    ttft_s: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    decode_bytes_per_token: int | None = None   # weights + KV cache at the mean decode context
    prefill_flops: float | None = None          # 2 × parameters × prompt tokens
    bandwidth_efficiency: float | None = None   # share of this machine's measured bandwidth that decode reached
    compute_efficiency: float | None = None     # share of this machine's measured GFLOPS that prefill reached
    skipped: str | None = None


@dataclass
class DeviceEstimate:
    """Not measured: this machine's numbers scaled by the device profile's bandwidth and compute."""
    device: str
    bandwidth_gbps: float
    cpu_gflops: float
    local_bandwidth_gbps: float   # this machine, numpy copy at the profiled thread count
    local_gflops: float           # this machine, numpy float32 matmul at the profiled thread count
    prompts: list[PromptEstimate]
    budget_bytes: int
    fits_budget: bool             # peak resident memory measured here ≤ the device's memory budget
    notes: list[str] = field(default_factory=list)
    kind: str = "estimate"

    @property
    def decode_tokens_per_s(self) -> float | None:
        return next((p.decode_tokens_per_s for p in self.prompts if p.decode_tokens_per_s), None)


@dataclass
class BundleProfile:
    name: str
    path: str
    format: str
    runtime: str
    precision: str
    size_bytes: int               # model file(s) on disk; tokenizer and config files not counted
    weight_bytes: int             # tensor bytes read for every decoded token
    params: int
    kv_bytes_per_token: int | None
    kl: float | None              # from the manifest's quality check
    threads: int
    n_ctx: int                    # context the engine was opened with (longest prompt + gen, capped by the model)
    gen: int
    first_load_s: float           # cold load in the fresh process, importing the runtime on the way
    load_s: Spread                # warm loads after it
    peak_rss_bytes: int           # high-water resident memory of the measuring process
    baseline_rss_bytes: int       # resident memory before loading (interpreter and libraries)
    base_peak_rss_bytes: int | None  # kept adapters: the peak before any adapter ran (peak_rss_bytes is after each ran)
    adapters_run: int
    prompts: list[PromptProfile]
    notes: list[str] = field(default_factory=list)
    estimate: DeviceEstimate | None = None
    finetune: dict | None = None  # `edgeq compare`: the fine-tune metrics on the user's eval data
    roofline: dict | None = None  # decode against this machine's measured memory bandwidth (profiling.roofline)
    speculation: dict | None = None  # `--draft`: tok/s with and without, acceptance (profile_speculation.measure)

    @property
    def decode_tokens_per_s(self) -> Spread | None:
        """The headline decode speed: after the shortest prompt that fits."""
        return next((p.decode_tokens_per_s for p in self.prompts if p.decode_tokens_per_s), None)

    def prompt(self, tokens: int) -> PromptProfile:
        for p in self.prompts:
            if p.prompt_tokens == tokens:
                return p
        raise KeyError(tokens)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["decode_tokens_per_s"] = asdict(self.decode_tokens_per_s) if self.decode_tokens_per_s else None
        if self.estimate:
            out["estimate"]["decode_tokens_per_s"] = self.estimate.decode_tokens_per_s
        return out


@dataclass
class ProfileResult:
    bundles: list[BundleProfile]
    prompt_tokens: list[int]
    gen: int
    repeat: int
    machine: dict
    device: str | None = None
    quality_label: str = "KL vs reference (nats, from the manifest)"

    def __getitem__(self, name: str) -> BundleProfile:
        for b in self.bundles:
            if name in (b.name, b.path):
                return b
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "gen": self.gen, "repeat": self.repeat, "machine": self.machine,
                "device": self.device, "bundles": [b.to_dict() for b in self.bundles]}

    def table(self) -> str:
        return table(self)

    def save_json(self, path: str | Path) -> Path:
        return write_json(self, path)

    def plot(self, path: str | Path) -> Path:
        return plot(self, path)


def fmt_num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.3g}"


def _spread(s: Spread | None, scale: float = 1.0) -> str:
    if s is None:
        return "-"
    return f"{fmt_num(s.median * scale)} ({fmt_num(s.min * scale)}–{fmt_num(s.max * scale)})"


def text_rows(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]


def table(result: ProfileResult) -> str:
    """One summary row per bundle, then one row per bundle and prompt length; medians with (min–max)."""
    lines = [f"measured on {result.machine['cpu']} ({result.machine['cpus']} CPUs); median (min–max) of "
             f"{result.repeat} repeats after a warm-up; decode = {result.gen} greedy tokens after the prompt", ""]
    lines += text_rows(["bundle", "format", "precision", "size MB", "KL", "cold load s", "load s", "peak RSS MB", "threads", "context"], [
        [b.name, b.format, b.precision, fmt_num(b.size_bytes / MB), "-" if b.kl is None else f"{b.kl:.4f}",
         fmt_num(b.first_load_s), _spread(b.load_s), fmt_num(b.peak_rss_bytes / MB), str(b.threads), str(b.n_ctx)] for b in result.bundles])
    lines.append("")
    rows = []
    for b in result.bundles:
        for p in b.prompts:
            if p.skipped:
                rows.append([b.name, str(p.prompt_tokens), f"skipped: {p.skipped}", "", ""])
            else:
                rows.append([b.name, str(p.prompt_tokens), _spread(p.ttft_s, 1e3), _spread(p.prefill_tokens_per_s),
                             _spread(p.decode_tokens_per_s)])
    lines += text_rows(["bundle", "prompt", "TTFT ms", "prefill tok/s", "decode tok/s"], rows)
    bound = [b for b in result.bundles if b.roofline]
    if bound:
        lines += ["", "decode vs the memory-bandwidth roofline (bytes read per token ÷ this machine's measured bandwidth):"]
        lines += text_rows(["bundle", "MB per token", "bandwidth GB/s", "roofline tok/s", "decode / roofline"], [
            [b.name, fmt_num(b.roofline["bytes_per_token"] / MB), fmt_num(b.roofline["bandwidth_gbps"]),
             fmt_num(b.roofline["bound_tokens_per_s"]), f"{b.roofline['fraction']:.0%}"] for b in bound])
    from .profile_speculation import lines as speculation_lines

    lines += speculation_lines(result.bundles)
    estimates = [b for b in result.bundles if b.estimate]
    if estimates:
        e = estimates[0].estimate
        lines += ["", f"ESTIMATE for {e.device} (not measured): {e.bandwidth_gbps:g} GB/s, {e.cpu_gflops:g} GFLOPS "
                      f"(this machine measured {e.local_bandwidth_gbps:.1f} GB/s, {e.local_gflops:.1f} GFLOPS)"]
        rows = []
        for b in estimates:
            fits = "fits" if b.estimate.fits_budget else "OVER"
            for p in b.estimate.prompts:
                if p.skipped:
                    rows.append([b.name, str(p.prompt_tokens), f"skipped: {p.skipped}", "", "", ""])
                else:
                    rows.append([b.name, str(p.prompt_tokens), fmt_num(p.ttft_s * 1e3), fmt_num(p.prefill_tokens_per_s),
                                 fmt_num(p.decode_tokens_per_s), f"{fits} {b.estimate.budget_bytes / 2**30:g} GiB budget"])
        lines += text_rows(["bundle", "prompt", "est. TTFT ms", "est. prefill tok/s", "est. decode tok/s", "memory"], rows)
        lines += [f"note: {n}" for n in e.notes]
    judged = [b for b in result.bundles if b.finetune]
    if judged:
        data = judged[0].finetune.get("data") or {}
        lines += ["", f"on {data.get('path', 'the eval data')}: {data.get('scored_tokens', '?')} assistant tokens, "
                      f"{(judged[0].finetune.get('agreement') or {}).get('replies', 0)} greedy replies"]
        lines += text_rows(["bundle", "size MB", "KL", "top-1", "flip retention", "noise/shift", "reply exact", "chrF"], [
            [b.name, fmt_num(b.size_bytes / MB), f"{b.finetune['kl']:.4f}", f"{b.finetune['top1']:.3f}",
             _opt(b.finetune.get("flip_retention")), _opt(b.finetune.get("noise_to_shift")),
             _opt((b.finetune.get("agreement") or {}).get("exact_match")), _opt((b.finetune.get("agreement") or {}).get("chrf"))]
            for b in judged])
    lines += [f"note: {b.name}: peak RSS {fmt_num(b.base_peak_rss_bytes / MB)} MB running the base, {fmt_num(b.peak_rss_bytes / MB)} MB "
              f"after each of its {b.adapters_run} adapters ran (+{fmt_num((b.peak_rss_bytes - b.base_peak_rss_bytes) / MB)} MB)"
              for b in result.bundles if b.base_peak_rss_bytes]
    lines += [f"note: {b.name}: {n}" for b in result.bundles for n in b.notes]
    return "\n".join(lines)


def _opt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def check_output(path: str | Path) -> Path:
    """Fails before any measurement if `path` could not be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise EdgeqError(f"output folder {parent} does not exist; create it first or choose another path")
    if path.is_dir():
        raise EdgeqError(f"{path} is a folder; give a file name")
    return path


def _write_atomically(path: Path, write) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(result: ProfileResult, path: str | Path) -> Path:
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    return _write_atomically(check_output(path), lambda tmp: Path(tmp).write_text(text))


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise EdgeqError("the chart needs matplotlib, which is not installed; install it with: pip install 'edgeq[plot]'") from exc


def chart(result: ProfileResult):
    """A matplotlib Figure: x = size on disk, y = decode tokens/s (whiskers min–max), color = KL; every
    bundle is a labelled point (at 0 tok/s when no prompt fitted), device estimates as hollow markers."""
    require_matplotlib()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PLOT_SIZE_PX[0] / PLOT_DPI, PLOT_SIZE_PX[1] / PLOT_DPI), dpi=PLOT_DPI)
    ax = fig.add_subplot()
    kls = [b.kl for b in result.bundles if b.kl is not None]
    colors = ScalarMappable(Normalize(0.0, max(kls) if kls and max(kls) > 0 else 1.0), "viridis")
    for b in result.bundles:
        x, decode = b.size_bytes / MB, b.decode_tokens_per_s
        y = decode.median if decode else 0.0
        color = "lightgray" if b.kl is None else colors.to_rgba(b.kl)
        if decode:
            ax.errorbar(x, y, yerr=[[y - decode.min], [decode.max - y]], fmt="none", ecolor="gray", capsize=3)
        ax.scatter([x], [y], s=120, color=color, edgecolors="black", zorder=3)
        kl = "KL n/a" if b.kl is None else f"KL {b.kl:.4f}"
        if b.finetune and b.finetune.get("flip_retention") is not None:
            kl += f", retention {b.finetune['flip_retention']:.3f}"
        ax.annotate(f"{b.name}\n{b.precision}, {kl}", (x, y), xytext=(8, 6), textcoords="offset points", fontsize=8)
        if b.estimate and b.estimate.decode_tokens_per_s:
            ax.scatter([x], [b.estimate.decode_tokens_per_s], s=120, facecolors="none", edgecolors="black", linestyle="--",
                       zorder=3, label=f"estimate on {b.estimate.device} (not measured)")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles[:1], labels[:1], loc="best", fontsize=8)
    fig.colorbar(colors, ax=ax, label=result.quality_label)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(f"decode tokens/s (median, min–max over {result.repeat})")
    ax.set_title(f"size × quality × decode speed — measured on {result.machine['cpu']}", fontsize=10)
    ax.margins(0.2)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(result: ProfileResult, path: str | Path) -> Path:
    """Writes the chart as a PNG of PLOT_SIZE_PX pixels."""
    fig = chart(result)
    return _write_atomically(check_output(path), lambda tmp: fig.savefig(tmp, format="png", dpi=PLOT_DPI))
