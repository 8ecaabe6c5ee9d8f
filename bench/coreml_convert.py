"""Core ML export: what converting a 1.5B-shaped model to int4 costs (wall time, peak RSS, package size).

`edgeq.export(..., format="coreml", precision="int4", eval_tokens=0)` of the random
Qwen2.5-1.5B-shaped checkpoint (`shape-qwen2`, made once by lib/real_models.py; bf16, tied embeddings),
run as its own process under /usr/bin/time -v (exact peak RSS). The anchor, in the same run, is
edgeq's GGUF Q4_0 export of the same checkpoint. Bars (issue 4): peak RSS <= 16 GiB; int4 package
within 10% of parameters x 0.5 bytes + one fp16 scale per 32 weights.

Quality is bench/coreml_quality.py.

    python bench/coreml_convert.py [--runs 1]
"""
from __future__ import annotations

import json
import math
import shutil

from lib import harness

RSS_BAR_MIB = 16 * 1024


def main() -> None:
    ap = harness.arguments(__doc__, model="shape-qwen2", text=False, threads=None, work="edgeq-bench-coreml")
    ap.add_argument("--runs", type=int, default=1, help="cost runs; the best wall time and peak count")
    args = harness.parse(ap)
    harness.warm(args.model)
    best = {}
    for i in range(args.runs):
        for fmt, precision in (("gguf", "Q4_0"), ("coreml", "int4")):
            bundle = args.work / f"{fmt}-{precision}"
            shutil.rmtree(bundle, ignore_errors=True)
            run = harness.timed_process(harness.export_command(args.model, bundle, format=fmt, precision=precision),
                                        log=args.work / f"{fmt}.log")
            manifest = json.loads((bundle / "edgeq.json").read_text())
            file_bytes = harness.folder_bytes(bundle / manifest["model_file"])
            params = sum(math.prod(t["shape"]) for t in manifest["tensors"].values())
            print(f"run {i + 1} {fmt:<7}{precision:<6}{run.wall_s:8.1f} s {run.peak_rss_mib:9.0f} MiB peak "
                  f"{file_bytes / 2**20:8.0f} MiB file  {params / 1e9:.3f} B params")
            prev = best.get(fmt)
            best[fmt] = (min(run.wall_s, prev[0]) if prev else run.wall_s, min(run.peak_rss_mib, prev[1]) if prev else run.peak_rss_mib,
                         file_bytes, params, manifest["mismatches"])
            shutil.rmtree(bundle)
    wall, rss, size, params, mismatches = best["coreml"]
    expected = params * 0.5 + params / 32 * 2
    verdicts = harness.Verdicts()
    verdicts.check(rss <= RSS_BAR_MIB, f"Core ML int4 peak RSS {rss / 1024:.2f} GiB (bar <= 16 GiB); "
                   f"{rss / best['gguf'][1]:.2f}x edgeq's GGUF Q4_0 export")
    verdicts.info(f"Core ML int4 wall {wall:.0f} s = {wall / best['gguf'][0]:.2f}x edgeq's GGUF Q4_0 export ({best['gguf'][0]:.0f} s)")
    verdicts.check(abs(size / expected - 1) <= 0.10, f"int4 package {size / 2**20:.0f} MiB = "
                   f"{size / expected:.3f}x params*0.5 + scales ({expected / 2**20:.0f} MiB; bar within 10%); {len(mismatches)} mismatches")
    verdicts.exit()


if __name__ == "__main__":
    main()
