"""Quality, size, export time and decode speed of edgeq's ExecuTorch `.pte` against llama.cpp Q4_0 (+imatrix), on the same
tokens and threads.

Rows: executorch fp32 (must reproduce torch); 8da4w as exported by default (GPTQ on edgeq's built-in calibration text,
int8 head); 8da4w with `rounding="nearest"` (each group alone, the rounding torchao's own config does, but on edgeq's
positive-scale search); 8da4w with GPTQ on the calibration text llama.cpp's imatrix also gets; 8da8w. Anchor: llama.cpp
Q4_0 with an importance matrix from that same calibration text — by default written by edgeq's GGUF converter (llama.cpp's
own quantizer through the llama-cpp-python binding); with LLAMA_CPP_BIN/LLAMA_CPP_SRC set, by llama.cpp's own
convert_hf_to_gguf.py + llama-imatrix + llama-quantize (`--llamacpp-tools`). All scored by edgeq's evaluator against the
torch reference logits, computed once. Decode tokens/s: 64 greedy-free steps (forward one token) after a 64-token prompt,
each engine at --threads, in this same run.

Bars (issue 30): fp32 KL <= 1e-4; 8da4w (default) KL <= Q4_0+imatrix's at <= its size.

    python bench/executorch_quality.py [--model qwen-coder] [--threads 2]

Measured numbers: see bench/README.md.
"""
from __future__ import annotations

import resource
import time

from lib import anchors
from lib import harness
import numpy as np

import edgeq


# label -> (precision, rounding (None: the default, GPTQ), whether GPTQ gets the anchor's calibration text)
ROWS = {"executorch-fp32": ("fp32", None, False), "executorch-8da4w": ("8da4w", None, False),
        "executorch-8da4w-nearest": ("8da4w", "nearest", False), "executorch-8da4w+calibration": ("8da4w", None, True),
        "executorch-8da8w": ("8da8w", None, False)}


def export_executorch(args, label: str, precision: str, rounding: str | None, calibration) -> tuple:
    started = time.perf_counter()
    bundle = edgeq.export(args.model, format="executorch", precision=precision, rounding=rounding, calibration=calibration,
                          calibration_tokens=args.calibration_tokens, output=args.work / label, eval_tokens=0, progress=False)
    return bundle, time.perf_counter() - started


def export_q4_0(args, calibration) -> tuple:
    if args.llamacpp_tools:
        files = anchors.llamacpp_files(args.model, args.work, ["Q4_0"], calibration, args.calibration_tokens, args.threads)
        return files["Q4_0+imatrix"], None
    started = time.perf_counter()
    # rounding "nearest": llama.cpp's own quantizer weighted by the importance matrix of the text (given text, edgeq's
    # GGUF export would round by GPTQ instead: not the anchor)
    bundle = edgeq.export(args.model, format="gguf", precision="Q4_0", calibration=calibration, rounding="nearest",
                          calibration_tokens=args.calibration_tokens, output=args.work / "gguf-Q4_0+imatrix", eval_tokens=0,
                          progress=False)
    return bundle, time.perf_counter() - started


def decode_speed(engine, steps: int = 64) -> float:
    """Tokens/s of one-token forwards after a 64-token prompt (the ids are a fixed ramp: speed, not quality)."""
    engine.reset()
    engine.forward(list(range(100, 164)))
    started = time.perf_counter()
    for t in range(steps):
        engine.forward([200 + t])
    return steps / (time.perf_counter() - started)


def main() -> None:
    ap = harness.arguments(__doc__, tokens=2048, ctx=512, calibration_tokens=4096, work="edgeq-bench-executorch-quality")
    ap.add_argument("--llamacpp-tools", action="store_true", help="the anchor from llama.cpp's own tools (LLAMA_CPP_BIN/SRC)")
    ap.add_argument("--rows", help=f"comma-separated executorch rows to run (default: all of {', '.join(ROWS)}; none: the anchor alone); "
                    "the anchor always runs")
    args = harness.parse(ap, fresh_work=True)
    calibration = harness.text_tail(args.text, args.work)
    reference = harness.Reference(args.model, args.text, args.tokens, args.ctx, args.threads)
    asked = [] if args.rows == "none" else args.rows.split(",") if args.rows else list(ROWS)
    if unknown := set(asked) - set(ROWS):
        raise SystemExit(f"--rows: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    rows = {label: (precision, rounding, calibration if calibrated else None)
            for label, (precision, rounding, calibrated) in ROWS.items() if label in asked}
    results, sizes = {}, {}
    for label, (precision, rounding, calib) in rows.items():
        bundle, seconds = export_executorch(args, label, precision, rounding, calib)
        sizes[label] = (bundle / "model.pte").stat().st_size
        engine = harness.bundle_engine(bundle, args.threads, args.ctx)
        speed = decode_speed(engine)
        q = results[label] = reference.score(engine)
        print(f"{label:30s} KL {q.kl:.6f}  top-1 {q.top1:.4f}  ppl {q.ppl:.3f} (ref {q.ppl_ref:.3f})  {sizes[label] / 2**20:.1f} MiB"
              f"  export {seconds:.0f} s  decode {speed:.1f} tok/s", flush=True)
    anchor, seconds = export_q4_0(args, calibration)
    gguf = anchor if anchor.suffix == ".gguf" else next(anchor.glob("*.gguf"))
    sizes["Q4_0+imatrix"] = gguf.stat().st_size
    engine = harness.gguf_engine(gguf, args.threads, args.ctx)
    speed = decode_speed(engine)
    q = results["Q4_0+imatrix"] = reference.score(engine)
    print(f"{'llama.cpp-Q4_0+imatrix':30s} KL {q.kl:.6f}  top-1 {q.top1:.4f}  ppl {q.ppl:.3f}  {sizes['Q4_0+imatrix'] / 2**20:.1f} MiB"
          f"  decode {speed:.1f} tok/s", flush=True)
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

    verdicts = harness.Verdicts()
    if "executorch-fp32" in results:
        verdicts.check(results["executorch-fp32"].kl <= 1e-4, f"fp32 KL {results['executorch-fp32'].kl:.2e} <= 1e-4")
    if "executorch-8da4w" in results:
        verdicts.at_most("executorch-8da4w KL / Q4_0+imatrix KL", results["executorch-8da4w"].kl / results["Q4_0+imatrix"].kl, 1.0)
        verdicts.at_most("executorch-8da4w size / Q4_0+imatrix size", sizes["executorch-8da4w"] / sizes["Q4_0+imatrix"], 1.0)
    if {"executorch-8da4w", "executorch-8da4w-nearest"} <= set(results):
        verdicts.info(f"GPTQ / nearest KL = {results['executorch-8da4w'].kl / results['executorch-8da4w-nearest'].kl:.3f}")
    print(f"({reference.describe(args.text)}; calibration: the last 200k characters of it, {args.calibration_tokens} tokens; "
          f"threads {args.threads}; anchor {'llama.cpp tools' if args.llamacpp_tools else 'edgeq GGUF Q4_0 (llama.cpp quantizer)'})")
    verdicts.exit()


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
