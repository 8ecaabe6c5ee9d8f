"""Planned vs uniform precision at the same size (issue 5 bars), for GGUF, ONNX or Core ML.

For each uniform precision (GGUF: Q4_K_M and Q4_0; ONNX and Core ML: int4 block 32) made with an
importance matrix from the calibration text, edgeq plans a model whose weights take no more bytes,
then both are measured against the torch reference on held-out text. Prints KL, top-1, weight
bytes and the ratio planned / uniform.

    python bench/plan_quality.py [MODEL] [--format gguf|onnx|coreml] [--text wikitext/valid.txt]

The uniform files come from llama.cpp's own quantizer (llama_model_quantize, the code behind
llama-quantize) through edgeq's converter, which bench/gguf_quality.py checks against the
llama-quantize binary itself.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import edgeq

DEFAULT_MODEL = Path.home() / ".cache/edgeq/models/smollm2-135m-instruct-offgrid"
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/valid.txt"
BARS = {"gguf": {"Q4_K_M": 0.7, "Q4_0": 0.5}, "onnx": {"int4": 0.7}, "coreml": {"int4": 0.7}}


def split_text(text: Path, folder: Path) -> tuple[Path, Path]:
    """First half calibrates, second half evaluates: the plan never sees the text it is judged on."""
    content = text.read_text()
    half = len(content) // 2
    calibration, held_out = folder / "calibration.txt", folder / "held_out.txt"
    calibration.write_text(content[:half])
    held_out.write_text(content[half:])
    return calibration, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--format", default="gguf", choices=sorted(BARS))
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeq-plan-bench-"))
    calibration, held_out = split_text(args.text, work)

    start = time.perf_counter()
    edgeq.plan(args.model, format=args.format, bits_per_weight=6.0, calibration=calibration)
    print(f"sensitivity (cold cache): {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    edgeq.plan(args.model, format=args.format, bits_per_weight=5.5, calibration=calibration)
    print(f"re-plan (warm cache): {time.perf_counter() - start:.1f} s")

    print(f"{'anchor':8} {'bytes':>12} {'KL':>8} {'top-1':>7} | {'planned bytes':>13} {'KL':>8} {'top-1':>7} | KL ratio (bar)")
    for precision, bar in BARS[args.format].items():
        uniform = edgeq.export(args.model, format=args.format, precision=precision, calibration=calibration,
                               output=work / precision, eval_tokens=0)
        size_u = weight_bytes(uniform)
        planned = edgeq.export(args.model, format=args.format, size=size_u, calibration=calibration,
                               output=work / f"planned-{precision}", eval_tokens=0)
        size_p = weight_bytes(planned)
        q_uniform = edgeq.evaluate(uniform, text=held_out, tokens=args.tokens, ctx=args.ctx)
        q_planned = edgeq.evaluate(planned, text=held_out, tokens=args.tokens, ctx=args.ctx)
        ratio = q_planned.kl / q_uniform.kl
        verdict = "ok" if ratio <= bar and size_p <= size_u else "MISSED"
        print(f"{precision:8} {size_u:>12,} {q_uniform.kl:8.4f} {q_uniform.top1:7.3f} | {size_p:>13,} {q_planned.kl:8.4f} {q_planned.top1:7.3f} | "
              f"{ratio:.2f} (≤ {bar}) {verdict}")


def weight_bytes(bundle: Path) -> int:
    """Bytes of the weights as written (read back from the file), the quantity the plan budgets."""
    return sum(t["bytes"] for t in edgeq.inspect(bundle)["tensors"].values())

if __name__ == "__main__":
    main()
