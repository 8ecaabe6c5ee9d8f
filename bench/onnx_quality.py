"""Quality of edgeq's ONNX export against the torch reference and llama.cpp's own quantizer, on the same tokens.

Rows: edgeq ONNX fp32; int8 and int4 as exported by default (GPTQ on edgeq's built-in calibration text,
a 4-bit lm_head, INT4 blocks of 64); int4 blocks of 32 with `rounding="nearest"` (each block alone, 8-bit
lm_head); int4 with GPTQ on the calibration text llama.cpp's imatrix also gets, in blocks of 64 and of 32
(the bar's); llama.cpp's own pipeline (convert_hf_to_gguf.py
f16, llama-quantize Q8_0 / Q4_0, and Q4_0 with llama-imatrix from the same calibration text); optionally onnxruntime-genai's builder int4 graph (--genai). All are
scored by edgeq's evaluator against the torch reference logits, computed once. Bars (issue 3):
fp32 KL < 1e-4 and top-1 >= 0.999; int8 KL <= 1.5x Q8_0's; int4 block 32 KL <= Q4_0's (both from the
same calibration text: the last 200k characters of the eval file, disjoint from its windows).

    LLAMA_CPP_BIN=... LLAMA_CPP_SRC=... python bench/onnx_quality.py [--genai]

Measured (2026-11-23, off-grid SmolLM2-135M-Instruct, 8 x 512 tokens of wikitext-2 valid, 2 threads):
see bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf_quality import calibration_text, llamacpp_files

import edgeq
from edgeq.bundle import read_manifest
from edgeq.evaluate import QualityAccumulator
from edgeq.importance import calibration_windows
from edgeq.intake import open_model
from edgeq.loading import open_engine
from edgeq.runtimes.llamacpp import LlamaCppEngine
from edgeq.runtimes.torch import TorchEngine

OFFGRID = Path.home() / ".cache/edgeq/models/smollm2-135m-instruct-offgrid"
WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt")


class GenaiGraph:
    """onnxruntime-genai's builder output run by plain onnxruntime (fresh sequence, every position's logits)."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.past = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        self.kv_shape = (1, config["num_key_value_heads"], 0, config["head_size"])

    def score(self, tokens):
        feeds = {"input_ids": np.array([tokens], dtype=np.int64), "attention_mask": np.ones((1, len(tokens)), dtype=np.int64)}
        for name in self.past:
            feeds[name] = np.zeros(self.kv_shape, dtype=np.float32)
        return self.session.run(["logits"], feeds)[0][0]

    def close(self):
        self.session = None


def build_genai(model: Path, out: Path, precision: str) -> Path:
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out), "-p", precision,
                    "-e", "cpu", "-c", str(out.parent / "genai-cache")], check=True, capture_output=True)
    return out


def measure(reference_logits, engine, windows) -> dict:
    acc = QualityAccumulator()
    for ref, window in zip(reference_logits, windows):
        acc.add(ref, engine.score(window), window)
    return acc.result(ctx=len(windows[0])).to_dict()


def engines(args, work: Path, calibration: Path):
    """(label, opener) of every row: edgeq ONNX bundles, llama.cpp's own GGUF files, optionally the genai graph."""
    rows = (("fp32", None, None, None), ("int8", None, None, None), ("int4", "nearest", 32, None), ("int4", None, None, None),
            ("int4", None, None, calibration), ("int4", None, 32, calibration))
    for precision, rounding, block, calib in rows:
        label = f"onnx-{precision}" + (f"-b{block}" if block else "") + (f"-{rounding}" if rounding else "") + ("+calibration" if calib else "")
        yield label, lambda p=precision, r=rounding, b=block, c=calib, l=label: open_bundle(args, work / l, p, r, b, c)
    files = llamacpp_files(args.model, work, ["Q8_0", "Q4_0"], calibration, args.calibration_tokens, args.threads)
    for name in ("Q8_0", "Q4_0", "Q4_0+imatrix"):
        yield f"llama.cpp-{name}", lambda f=files[name]: LlamaCppEngine(f, threads=args.threads, n_ctx=args.ctx)
    if args.genai:
        yield "genai-int4", lambda: GenaiGraph(build_genai(args.model, work / "genai-int4", "int4"), args.threads)


def open_bundle(args, out: Path, precision: str, rounding: str | None, block: int | None, calibration: Path | None):
    bundle = edgeq.export(args.model, format="onnx", precision=precision, output=out, eval_tokens=0, progress=False,
                          rounding=rounding, block_size=block, calibration=calibration, calibration_tokens=args.calibration_tokens)
    return open_engine(bundle, read_manifest(bundle), threads=args.threads, n_ctx=args.ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=OFFGRID)
    parser.add_argument("--text", type=Path, default=WIKITEXT)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--genai", action="store_true", help="also score onnxruntime-genai's builder int4 graph")
    args = parser.parse_args()

    source = open_model(args.model)
    windows = calibration_windows(source.chat_tokenizer(), args.text, args.tokens, args.ctx)
    reference = TorchEngine(source, threads=args.threads)
    reference_logits = [reference.score(w) for w in windows]
    reference.close()
    results = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        work = Path(tmp)
        calibration = calibration_text(args.text, work, 200_000)
        for label, opener in engines(args, work, calibration):
            engine = opener()
            q = results[label] = measure(reference_logits, engine, windows)
            engine.close()
            print(f"{label:22s} KL {q['kl']:.6f}  top-1 {q['top1']:.4f}  ppl {q['ppl']:.3f} (ref {q['ppl_ref']:.3f})", flush=True)

    fp32 = results["onnx-fp32"]
    print(f"[{'PASS' if fp32['kl'] < 1e-4 and fp32['top1'] >= 0.999 else 'FAIL'}] fp32 KL {fp32['kl']:.2e} < 1e-4, top-1 {fp32['top1']:.4f} >= 0.999")
    for ours, theirs, bar in (("onnx-int8", "llama.cpp-Q8_0", 1.5), ("onnx-int4-b32+calibration", "llama.cpp-Q4_0+imatrix", 1.0),
                              ("onnx-int4+calibration", "llama.cpp-Q4_0+imatrix", None), ("onnx-int4", "llama.cpp-Q4_0+imatrix", None),
                              ("onnx-int4-b32-nearest", "llama.cpp-Q4_0", None), ("onnx-int4", "genai-int4", None)):
        if ours in results and theirs in results:
            ratio = results[ours]["kl"] / results[theirs]["kl"]
            verdict = f"[{'PASS' if ratio <= bar else 'FAIL'}] " if bar else "[info] "
            print(f"{verdict}{ours} KL / {theirs} KL = {ratio:.3f}" + (f" (bar <= {bar})" if bar else ""))
    print(f"({len(windows)} windows x {args.ctx} tokens of {args.text.name}; calibration: the last 200k characters of it, "
          f"{args.calibration_tokens} tokens, disjoint from the windows)")


if __name__ == "__main__":
    main()
