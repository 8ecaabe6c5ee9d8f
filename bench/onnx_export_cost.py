"""Cost of an INT4 ONNX export of a 1.5B-shaped model: edgeq (GPTQ, and nearest rounding) vs onnxruntime-genai's builder.

The model is gguf_export_cost.py's random 1.5B-shaped checkpoint (Llama layout with Qwen2.5-1.5B's
shapes; made once, reused): cost does not depend on the weights' values. Each export runs as its own
process under /usr/bin/time -v (exact peak RSS). edgeq's default rounds by GPTQ on its built-in
calibration text, layer by layer over the float model; `--rounding nearest` rounds each block alone,
as the builder does (its default RTN). No bar in the issue; printed as ratios to the builder's run.

    python bench/onnx_export_cost.py [--model FOLDER]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import anchors
from gguf_export_cost import MODELS, warm

EDGEQ_EXPORT = ("import sys, edgeq; edgeq.export(sys.argv[1], format='onnx', precision='int4', rounding=sys.argv[3], "
                "output=sys.argv[2], eval_tokens=0, progress=False)")


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=MODELS / "bench-llama-1.5b-shape",
                    help="HF folder (default: the 1.5B-shaped model `python bench/gguf_export_cost.py` makes)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeq-bench-onnx-export"))
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is missing: run `python bench/gguf_export_cost.py` once to make it")
    args.work.mkdir(parents=True, exist_ok=True)
    warm(args.model)

    results = {}
    out = args.work / "genai-int4"
    shutil.rmtree(out, ignore_errors=True)
    run = anchors.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(args.model), "-o", str(out), "-p", "int4",
                       "-e", "cpu", "-c", str(args.work / "genai-cache")], log=args.work / "genai.log")
    results["genai builder int4"] = (run.wall_s, run.peak_rss_mib, folder_mib(out))
    shutil.rmtree(out)
    for rounding in ("gptq", "nearest"):
        out = args.work / f"edgeq-{rounding}"
        shutil.rmtree(out, ignore_errors=True)
        run = anchors.run([sys.executable, "-c", EDGEQ_EXPORT, str(args.model), str(out), rounding], log=args.work / f"edgeq-{rounding}.log")
        results[f"edgeq int4 {rounding}"] = (run.wall_s, run.peak_rss_mib, folder_mib(out))
        shutil.rmtree(out)

    anchor_wall, anchor_rss, _ = results["genai builder int4"]
    print(f"{args.model.name}: INT4 ONNX export")
    print(f"{'':<22}{'wall s':>9}{'peak RSS MiB':>14}{'output MiB':>12}{'wall ratio':>12}{'RSS ratio':>11}")
    for name, (wall, rss, size) in results.items():
        print(f"{name:<22}{wall:>9.1f}{rss:>14.0f}{size:>12.0f}{wall / anchor_wall:>12.2f}{rss / anchor_rss:>11.2f}")


if __name__ == "__main__":
    main()
