"""Cost of an INT4 ONNX export of a 1.5B-shaped model: edgeq (GPTQ, and nearest rounding) vs onnxruntime-genai's builder.

The model is the random 1.5B-shaped checkpoint `shape-llama` (Llama layout with Qwen2.5-1.5B's
shapes; made once by lib/real_models.py): cost does not depend on the weights' values. Each export runs
as its own process under /usr/bin/time -v (exact peak RSS). edgeq's default rounds by GPTQ on its
built-in calibration text, layer by layer over the float model; `--rounding nearest` rounds each
block alone, as the builder does (its default RTN). No bar in the issue; printed as ratios to the
builder's run.

    python bench/onnx_export_cost.py [--model FOLDER]
"""
from __future__ import annotations

import shutil

from lib import anchors
from lib import harness


def main() -> None:
    ap = harness.arguments(__doc__, model="shape-llama", text=False, threads=None, work="edgeq-bench-onnx-export")
    args = harness.parse(ap)
    harness.warm(args.model)

    out = {name: args.work / name.replace(" ", "-") for name in ("genai builder int4", "edgeq int4 gptq", "edgeq int4 nearest")}
    runs = {"genai builder int4": anchors.genai_builder_command(args.model, out["genai builder int4"], args.work / "genai-cache")}
    for rounding in ("gptq", "nearest"):
        name = f"edgeq int4 {rounding}"
        runs[name] = harness.export_command(args.model, out[name], format="onnx", precision="int4", rounding=rounding)
    results = {}
    for name, argv in runs.items():
        shutil.rmtree(out[name], ignore_errors=True)
        run = harness.timed_process(argv, log=out[name].with_suffix(".log"))
        results[name] = (run.wall_s, run.peak_rss_mib, harness.folder_bytes(out[name]) / 2**20)
        shutil.rmtree(out[name])

    anchor_wall, anchor_rss, _ = results["genai builder int4"]
    print(f"{args.model.name}: INT4 ONNX export")
    harness.table({"wall s": ">9.1f", "peak RSS MiB": ">14.0f", "output MiB": ">12.0f", "wall ratio": ">12.2f", "RSS ratio": ">11.2f"},
                  {name: (wall, rss, size, wall / anchor_wall, rss / anchor_rss) for name, (wall, rss, size) in results.items()}, 22)


if __name__ == "__main__":
    main()
