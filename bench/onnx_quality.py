"""Quality of edgeq's ONNX export against the torch reference and its anchors, on the same tokens.

Prints mean KL, top-1 agreement and perplexity for ONNX fp32/fp16/int8/int4 and for the anchors:
llama.cpp Q8_0 and Q4_0 (edgeq's GGUF export) and onnxruntime-genai's model builder int4 (its graph
run in plain onnxruntime). Then the bars as ratios: fp32 KL < 1e-4 and top-1 >= 0.999,
int8 KL <= 1.5x Q8_0's, int4 (block 32) KL <= Q4_0's. With --calibration both sides get the same
importance text (llama.cpp's imatrix, edgeq's importance-weighted scale search).

    python bench/onnx_quality.py --model ~/.cache/edgeq/models/smollm2-135m-instruct-offgrid \
        --text /work/shared/data/wikitext-2/valid.txt --tokens 4096 --ctx 512
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import edgeq
from edgeq.bundle import read_manifest
from edgeq.evaluate import QualityAccumulator
from edgeq.importance import calibration_windows
from edgeq.intake import open_model
from edgeq.loading import open_engine
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=OFFGRID)
    parser.add_argument("--text", type=Path, default=WIKITEXT)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--calibration", type=Path, help="importance text for both edgeq int4/int8 and llama.cpp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="subset of rows, e.g. onnx-int4 gguf-Q4_0")
    args = parser.parse_args()

    source = open_model(args.model)
    windows = calibration_windows(source.chat_tokenizer(), args.text, args.tokens, args.ctx)
    reference = TorchEngine(source, threads=args.threads)
    reference_logits = [reference.score(w) for w in windows]
    reference.close()
    rows = {f"onnx-{p}": ("onnx", p) for p in ("fp32", "fp16", "int8", "int4")}
    rows.update({f"gguf-{p}": ("gguf", p) for p in ("Q8_0", "Q4_0")})
    rows["genai-int4"] = ("genai", "int4")
    results = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for label, (fmt, precision) in rows.items():
            if args.only and label not in args.only:
                continue
            if fmt == "genai":
                engine = GenaiGraph(build_genai(args.model, Path(tmp) / label, precision), args.threads)
            else:
                bundle = edgeq.export(args.model, format=fmt, precision=precision, output=Path(tmp) / label, eval_tokens=0,
                                      calibration=args.calibration if precision not in ("fp32", "fp16") else None)
                engine = open_engine(bundle, read_manifest(bundle), threads=args.threads, n_ctx=max(args.ctx, 512))
            results[label] = measure(reference_logits, engine, windows)
            engine.close()
            q = results[label]
            print(f"{label:12s} KL {q['kl']:.6f}  top-1 {q['top1']:.4f}  ppl {q['ppl']:.3f} (ref {q['ppl_ref']:.3f})", flush=True)

    def ratio(a, b):
        if a in results and b in results:
            print(f"{a} KL / {b} KL = {results[a]['kl'] / results[b]['kl']:.3f}")

    if "onnx-fp32" in results:
        q = results["onnx-fp32"]
        print(f"fp32 bars: KL {q['kl']:.2e} (< 1e-4: {q['kl'] < 1e-4}), top-1 {q['top1']:.4f} (>= 0.999: {q['top1'] >= 0.999})")
    ratio("onnx-int8", "gguf-Q8_0")   # bar: <= 1.5
    ratio("onnx-int4", "gguf-Q4_0")   # bar: <= 1.0
    ratio("onnx-int4", "genai-int4")
    print(f"({len(windows)} windows x {args.ctx} tokens of {args.text.name}, calibration: {args.calibration or 'none'})")


if __name__ == "__main__":
    main()
