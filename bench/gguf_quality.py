"""edgeq's GGUF quantization vs llama.cpp's own convert script + llama-quantize, same checkpoint.

Both files are measured by the same edgeq evaluator (KL, top-1, perplexity against the torch
reference) on the same token windows; the reference logits are computed once. Bars (issue 2):
F16 KL < 0.001 and top-1 >= 0.99; edgeq's Q8_0 / Q4_K_M KL within 10% of llama.cpp's.
With --imatrix, edgeq's `calibration=` is compared with llama-imatrix + llama-quantize --imatrix
on the same calibration text (taken from the end of the eval file, disjoint from the eval windows).

    LLAMA_CPP_BIN=... LLAMA_CPP_SRC=... python bench/gguf_quality.py [--model qwen-coder] [--imatrix]
"""
from __future__ import annotations

from pathlib import Path

from lib import anchors
from lib import harness

import edgeq

KL_RATIO_BAR = 1.10


def edgeq_files(model: Path, work: Path, types: list[str], calibration: Path | None, calib_tokens: int) -> dict[str, Path]:
    files = {}
    for t in types:
        bundle = edgeq.export(model, format="gguf", precision=t, output=work / f"edgeq-{t}", overwrite=True, eval_tokens=0, progress=False)
        files[t] = bundle / "model.gguf"
        if calibration and t != "F16":
            bundle = edgeq.export(model, format="gguf", precision=t, output=work / f"edgeq-{t}-imatrix", overwrite=True,
                                  eval_tokens=0, calibration=calibration, calibration_tokens=calib_tokens, progress=False)
            files[f"{t}+imatrix"] = bundle / "model.gguf"
    return files


def type_differences(ours: Path, theirs: Path) -> str:
    a = harness.gguf_types(ours)["tensors"]
    b = harness.gguf_types(theirs)["tensors"]
    diff = [f"{n}:{a[n]['type']}/{b.get(n, {}).get('type')}" for n in a if a[n]["type"] != b.get(n, {}).get("type")]
    missing = sorted(set(a) ^ set(b))
    note = f"{len(diff)} tensors differ in type" + (f" (e.g. {', '.join(diff[:3])})" if diff else "")
    return note + (f"; names only in one file: {missing[:4]}" if missing else "")


def main() -> None:
    ap = harness.arguments(__doc__, tokens=8192, ctx=512, calibration_tokens=8192, work="edgeq-bench-quality")
    ap.add_argument("--types", default="F16,Q8_0,Q4_K_M")
    ap.add_argument("--imatrix", action="store_true", help="also compare importance-matrix quantization")
    args = harness.parse(ap, fresh_work=True)
    types = args.types.upper().split(",")

    calibration = harness.text_tail(args.text, args.work) if args.imatrix else None
    ours = edgeq_files(args.model, args.work, types, calibration, args.calibration_tokens)
    theirs = anchors.llamacpp_files(args.model, args.work, types, calibration, args.calibration_tokens, args.threads)

    reference = harness.Reference(args.model, args.text, args.tokens, args.ctx, args.threads)
    print(f"{reference.describe(args.text)}, threads {args.threads}")
    print(f"{'type':<16}{'tool':<10}{'bpw':>7}{'KL':>11}{'top-1':>8}{'ppl':>9}{'ppl_ref':>9}")
    verdicts = harness.Verdicts()
    for name, path in ours.items():
        if name not in theirs:
            continue
        rows = {}
        for tool, file in (("edgeq", path), ("llama.cpp", theirs[name])):
            q = rows[tool] = reference.score(harness.gguf_engine(file, args.threads, reference.ctx))
            bpw = harness.gguf_types(file)["bits_per_weight"]
            print(f"{name:<16}{tool:<10}{bpw:>7.3f}{q.kl:>11.6f}{q.top1:>8.4f}{q.ppl:>9.3f}{q.ppl_ref:>9.3f}")
        ratio = rows["edgeq"].kl / rows["llama.cpp"].kl if rows["llama.cpp"].kl else float("inf")
        print(f"{'':<16}KL ratio edgeq/llama.cpp = {ratio:.3f}; {type_differences(path, theirs[name])}")
        if name == "F16":
            q = rows["edgeq"]
            verdicts.check(q.kl < 0.001 and q.top1 >= 0.99, f"F16 KL {q.kl:.6f} < 0.001 and top-1 {q.top1:.4f} >= 0.99")
        else:
            verdicts.at_most(f"{name} KL ratio edgeq/llama.cpp", ratio, KL_RATIO_BAR)
    verdicts.exit()


if __name__ == "__main__":
    main()
