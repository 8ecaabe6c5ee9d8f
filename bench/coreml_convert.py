"""Core ML export: what converting a 1.5B-shaped model to int4 costs (wall time, peak RSS, package size).

`edgeq.export(..., format="coreml", precision="int4", eval_tokens=0)` of the random
Qwen2.5-1.5B-shaped checkpoint that gguf_export_cost.py makes (bf16, tied embeddings), run as its
own process under /usr/bin/time -v (exact peak RSS). The anchor, in the same run, is edgeq's GGUF
Q4_0 export of the same checkpoint. Bars (issue 4): peak RSS <= 16 GiB; int4 package within 10% of
parameters x 0.5 bytes + one fp16 scale per 32 weights.

Quality is bench/coreml_quality.py.

    python bench/coreml_convert.py [--runs 1]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import anchors
from gguf_export_cost import MODELS, warm

EXPORT = ("import sys, edgeq; edgeq.export(sys.argv[1], format=sys.argv[3], precision=sys.argv[4], output=sys.argv[2], "
          "eval_tokens=0, progress=False)")
RSS_BAR_MIB = 16 * 1024
DEFAULT_MODEL = MODELS / "bench-qwen2-1.5b-shape"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _export_cost(model: Path, work: Path, fmt: str, precision: str) -> tuple[anchors.Run, Path]:
    bundle = work / f"{fmt}-{precision}"
    shutil.rmtree(bundle, ignore_errors=True)
    run = anchors.run([sys.executable, "-c", EXPORT, str(model), str(bundle), fmt, precision], log=work / f"{fmt}.log")
    return run, bundle


def cost(model: Path, work: Path, runs: int) -> None:
    if not (model / "config.json").is_file():
        print(f"making the 1.5B-shaped model at {model} (once)")
        subprocess.run([sys.executable, str(Path(__file__).with_name("gguf_export_cost.py")), "--make-model", "--arch", "qwen2", "--model", str(model)], check=True)
    work.mkdir(parents=True, exist_ok=True)
    warm(model)
    best = {}
    for i in range(runs):
        for fmt, precision in (("gguf", "Q4_0"), ("coreml", "int4")):
            run, bundle = _export_cost(model, work, fmt, precision)
            manifest = json.loads((bundle / "edgeq.json").read_text())
            file_bytes = _size(bundle / manifest["model_file"])
            params = sum(_numel(t["shape"]) for t in manifest["tensors"].values())
            print(f"run {i + 1} {fmt:<7}{precision:<6}{run.wall_s:8.1f} s {run.peak_rss_mib:9.0f} MiB peak "
                  f"{file_bytes / 2**20:8.0f} MiB file  {params / 1e9:.3f} B params")
            prev = best.get(fmt)
            best[fmt] = (min(run.wall_s, prev[0]) if prev else run.wall_s, min(run.peak_rss_mib, prev[1]) if prev else run.peak_rss_mib,
                         file_bytes, params, manifest["mismatches"])
            shutil.rmtree(bundle)
    wall, rss, size, params, mismatches = best["coreml"]
    expected = params * 0.5 + params / 32 * 2
    print(f"[{'PASS' if rss <= RSS_BAR_MIB else 'FAIL'}] Core ML int4 peak RSS {rss / 1024:.2f} GiB (bar <= 16 GiB); "
          f"{rss / best['gguf'][1]:.2f}x edgeq's GGUF Q4_0 export")
    print(f"[info] Core ML int4 wall {wall:.0f} s = {wall / best['gguf'][0]:.2f}x edgeq's GGUF Q4_0 export ({best['gguf'][0]:.0f} s)")
    print(f"[{'PASS' if abs(size / expected - 1) <= 0.10 else 'FAIL'}] int4 package {size / 2**20:.0f} MiB = "
          f"{size / expected:.3f}x params*0.5 + scales ({expected / 2**20:.0f} MiB; bar within 10%); {len(mismatches)} mismatches")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--runs", type=int, default=1, help="cost runs; the best wall time and peak count")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeq-bench-coreml"))
    args = ap.parse_args()
    cost(args.model, args.work, args.runs)


if __name__ == "__main__":
    main()
