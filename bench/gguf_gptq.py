"""GGUF with GPTQ in llama.cpp's own block types vs llama.cpp's importance-weighted quantizer, same file.

For each file type (default Q4_K_M and Q4_0), the same model is exported twice with the same calibration text:
`rounding="nearest"`, which is llama.cpp's quantizer (llama_model_quantize, the code behind llama-quantize
--imatrix; bench/gguf_quality.py checks it against the binary itself) with edgeq's importance matrix, and the
default `rounding="gptq"`, which rewrites every linear weight's blocks in the very types llama.cpp chose. The two
files have the same header and types, so the same size. Both are scored by llama.cpp against the torch reference
on the same held-out windows (the top of the text; calibration is its last 200k characters). Each export runs in
a child process under /usr/bin/time: wall time and peak RSS (wall times are rough on a shared machine).

    python bench/gguf_gptq.py [--model qwen-coder-perm] [--types Q4_K_M,Q4_0] [--tokens 4096]
"""
from __future__ import annotations

import json
import sys

from lib import harness

import edgeq

BARS = {"Q4_K_M": 0.8, "Q4_0": 0.8}  # KL of GPTQ / KL of llama.cpp + imatrix (issue 29: Q4_K_M ≤ 0.8×)
EXPORT = """
import json, sys, edgeq
args = json.loads(sys.argv[1])
edgeq.export(args.pop("model"), format="gguf", eval_tokens=0, overwrite=True, progress=False, **args)
"""


def export(model, work, precision: str, rounding: str, calibration, calibration_tokens: int):
    out = work / f"{precision}-{rounding}"
    options = dict(model=str(model), precision=precision, rounding=rounding, output=str(out), calibration=str(calibration),
                   calibration_tokens=calibration_tokens)
    run = harness.timed_process([sys.executable, "-c", EXPORT, json.dumps(options)], log=work / f"{out.name}.log")
    return out, run


def main() -> None:
    ap = harness.arguments(__doc__, model="qwen-coder-perm", tokens=4096, ctx=512, calibration_tokens=8192, work="edgeq-bench-gguf-gptq")
    ap.add_argument("--types", default="Q4_K_M,Q4_0")
    args = harness.parse(ap, fresh_work=True)
    calibration = harness.text_tail(args.text, args.work)
    reference = harness.Reference(args.model, args.text, args.tokens, args.ctx, args.threads)
    print(f"{reference.describe(args.text)}, threads {args.threads}; calibration: last 200k characters, "
          f"{args.calibration_tokens} tokens", flush=True)
    print(f"{'type':<8}{'rounding':<10}{'bytes':>14}{'bpw':>7}{'KL':>10}{'top-1':>8}{'ppl':>9}{'ppl_ref':>9}{'wall s':>8}{'RSS MiB':>9}")
    verdicts = harness.Verdicts()
    for precision in args.types.upper().split(","):
        rows = {}
        for rounding in ("nearest", "gptq"):
            bundle, run = export(args.model, args.work, precision, rounding, calibration, args.calibration_tokens)
            manifest = edgeq.inspect(bundle)
            q = reference.score(harness.bundle_engine(bundle, args.threads, reference.ctx))
            size = sum(t["bytes"] for t in manifest["tensors"].values())
            rows[rounding] = (q, size, manifest)
            print(f"{precision:<8}{rounding:<10}{size:>14,}{manifest['bits_per_weight']:>7.3f}{q.kl:>10.6f}{q.top1:>8.4f}"
                  f"{q.ppl:>9.3f}{q.ppl_ref:>9.3f}{run.wall_s:>8.0f}{run.peak_rss_mib:>9.0f}", flush=True)
        (near, near_size, near_m), (ours, our_size, our_m) = rows["nearest"], rows["gptq"]
        ratio = ours.kl / near.kl
        same_types = {n: t["type"] for n, t in near_m["tensors"].items()} == {n: t["type"] for n, t in our_m["tensors"].items()}
        print(f"{precision}: KL gptq / llama.cpp+imatrix = {ratio:.3f}; same types: {same_types}; rounding {our_m['rounding']}")
        verdicts.at_most(f"{precision} KL ratio gptq / llama.cpp+imatrix", ratio, BARS.get(precision, 1.0))
        verdicts.check(our_size <= near_size and same_types and our_m["rounding"] == "gptq",
                       f"{precision}: same types, {our_size:,} B <= {near_size:,} B, rounded by GPTQ")
    verdicts.exit()


if __name__ == "__main__":
    main()
