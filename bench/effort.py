"""`--effort standard` vs `--effort max` (learned scales on top of GPTQ), per format, against llama.cpp + imatrix.

For each FORMAT:PRECISION row the same model is exported at each effort with the same calibration text (the last
200k characters of the eval text, `--calibration-tokens`), each export in a child process under /usr/bin/time (wall
time, peak RSS). Every bundle and llama.cpp's own file of the anchor type (convert_hf_to_gguf.py f16, llama-imatrix on
the same text, llama-quantize) are scored against the torch reference on the same held-out windows (the top of the
text). Bars: max's KL below standard's in every row (the effort is only worth its time if it wins); the issue's bars
against llama.cpp are printed as ratios and judged where the row's file is no larger than the anchor's.

    LLAMA_CPP_BIN=... LLAMA_CPP_SRC=... python bench/effort.py [--model smollm2-perm] [--rows onnx:int4,gguf:Q4_K_M]
"""
from __future__ import annotations

import json
import sys

from lib import anchors
from lib import harness

import edgeq

ANCHOR = {"onnx:int4": "Q4_0", "gguf:Q4_K_M": "Q4_K_M", "gguf:Q4_0": "Q4_0", "coreml:int4": "Q4_0", "executorch:8da4w": "Q4_0"}
ISSUE_BARS = {"onnx:int4": 0.5, "gguf:Q4_K_M": 0.8, "coreml:int4": 0.7, "executorch:8da4w": 1.0}  # KL / anchor+imatrix's (issue 29, 30)
EXPORT = """
import json, sys, edgeq
args = json.loads(sys.argv[1])
edgeq.export(args.pop("model"), eval_tokens=0, overwrite=True, progress=False, **args)
"""


def export(model, work, row: str, effort: str, calibration, calibration_tokens: int):
    fmt, precision = row.split(":")
    out = work / f"{fmt}-{precision}-{effort}"
    options = dict(model=str(model), format=fmt, precision=precision, effort=effort, output=str(out),
                   calibration=str(calibration), calibration_tokens=calibration_tokens)
    run = harness.timed_process([sys.executable, "-c", EXPORT, json.dumps(options)], log=work / f"{out.name}.log")
    return out, run


def main() -> None:
    ap = harness.arguments(__doc__, model="smollm2-perm", tokens=4096, ctx=512, calibration_tokens=4096, work="edgeq-bench-effort")
    ap.add_argument("--rows", default="onnx:int4,gguf:Q4_K_M", help="FORMAT:PRECISION,... exported at each effort")
    ap.add_argument("--efforts", default="standard,max")
    args = harness.parse(ap, fresh_work=True)
    rows, efforts = args.rows.split(","), args.efforts.split(",")
    calibration = harness.text_tail(args.text, args.work)
    reference = harness.Reference(args.model, args.text, args.tokens, args.ctx, args.threads)
    print(f"{reference.describe(args.text)}, threads {args.threads}; calibration: last 200k characters, "
          f"{args.calibration_tokens} tokens", flush=True)
    types = sorted({ANCHOR[row] for row in rows})
    files = anchors.llamacpp_files(args.model, args.work, types, calibration, args.calibration_tokens, args.threads)
    print(f"{'row':<22}{'effort':<10}{'bytes':>14}{'KL':>10}{'top-1':>8}{'ppl':>9}{'ppl_ref':>9}{'wall s':>8}{'RSS MiB':>9}")
    scores = {}
    for name in (f"{t}+imatrix" for t in types):
        q = reference.score(harness.gguf_engine(files[name], args.threads, reference.ctx))
        size = sum(t["bytes"] for t in harness.gguf_types(files[name])["tensors"].values())
        scores[name] = (q, size)
        print(f"{'llama.cpp ' + name:<22}{'':<10}{size:>14,}{q.kl:>10.6f}{q.top1:>8.4f}{q.ppl:>9.3f}{q.ppl_ref:>9.3f}", flush=True)
    verdicts = harness.Verdicts()
    for row in rows:
        for effort in efforts:
            bundle, run = export(args.model, args.work, row, effort, calibration, args.calibration_tokens)
            manifest = edgeq.inspect(bundle)
            q = reference.score(harness.bundle_engine(bundle, args.threads, reference.ctx))
            size = sum(t["bytes"] for t in manifest["tensors"].values())  # weight bytes, as the anchor's
            scores[(row, effort)] = (q, size)
            print(f"{row:<22}{effort:<10}{size:>14,}{q.kl:>10.6f}{q.top1:>8.4f}{q.ppl:>9.3f}{q.ppl_ref:>9.3f}"
                  f"{run.wall_s:>8.0f}{run.peak_rss_mib:>9.0f}  rounding {manifest['rounding']}", flush=True)
        anchor, anchor_size = scores[f"{ANCHOR[row]}+imatrix"]
        for effort in efforts:
            q, size = scores[(row, effort)]
            ratio = q.kl / anchor.kl
            text = f"{row} {effort}: KL / llama.cpp {ANCHOR[row]}+imatrix = {ratio:.3f}, size {size / anchor_size:.3f}x"
            if row in ISSUE_BARS and size <= anchor_size:
                verdicts.at_most(text, ratio, ISSUE_BARS[row])
            else:
                verdicts.info(text + (" (larger than the anchor: not judged)" if row in ISSUE_BARS else ""))
        if "standard" in efforts and "max" in efforts:
            verdicts.at_most(f"{row}: KL max / standard", scores[(row, "max")][0].kl / scores[(row, "standard")][0].kl, 0.999)
    verdicts.exit()


if __name__ == "__main__":
    main()
