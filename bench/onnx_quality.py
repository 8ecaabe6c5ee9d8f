"""Quality of edgeq's ONNX export against the torch reference and llama.cpp's own quantizer, on the same tokens.

Rows: edgeq ONNX fp32; int8 and int4 as exported by default (rotated, GPTQ on edgeq's built-in calibration text,
INT4 blocks of 32 with float16 scales, an untied lm_head at 4 bits, a tied table once at 8 bits); int4 blocks of 32
with `rounding="nearest"` (each block alone, unrotated, 8-bit lm_head); int4 with the calibration text llama.cpp's
imatrix also gets: by default, unrotated (`rotate="off"`), at `effort="max"`, and planned per tensor within
Q4_0+imatrix's weight bytes (`size=`: int4 blocks of 16-128, int8 or fp16 by measured sensitivity); llama.cpp's own pipeline
(convert_hf_to_gguf.py f16, llama-quantize Q8_0 / Q4_0, and Q4_0 with llama-imatrix from the same calibration text);
optionally onnxruntime-genai's builder int4 graph (--genai). All are scored by edgeq's evaluator against the torch
reference logits, computed once, and printed with their weight bytes.
Bars (issue 3): fp32 KL < 1e-4 and top-1 >= 0.999; int8 KL <= 1.5x Q8_0's; unrotated int4 KL <= Q4_0 + imatrix's
(both from the same calibration text: the last 200k characters of the eval file, disjoint from its windows).
Issue 13: the default int4 (built-in text) KL <= Q4_0 + imatrix's (which saw text like the windows').
Issue 29: the default int4 with the calibration text KL <= 0.5x Q4_0 + imatrix's, and the planned one likewise, each
judged where its weights are no larger (the max row's ratio is printed beside them).
`--rows` runs only the edgeq rows named (the llama.cpp anchors always run; the planned row needs the default one).

    LLAMA_CPP_BIN=... LLAMA_CPP_SRC=... python bench/onnx_quality.py [--model qwen-coder] [--genai]

Measured numbers: see bench/README.md.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from lib import anchors
from lib import harness
import numpy as np

import edgeq

# (edgeq row, anchor row, bar or None for a ratio that is only reported)
RATIOS = (("onnx-int8", "llama.cpp-Q8_0", 1.5), ("onnx-int4-unrotated+calibration", "llama.cpp-Q4_0+imatrix", 1.0),
          ("onnx-int4+calibration", "llama.cpp-Q4_0+imatrix", None), ("onnx-int4-max+calibration", "llama.cpp-Q4_0+imatrix", None),
          ("onnx-int4", "llama.cpp-Q4_0+imatrix", 1.0), ("onnx-int4-b32-nearest", "llama.cpp-Q4_0", None),
          ("onnx-int4", "genai-int4", None))
JUDGED = ("onnx-int4+calibration", "onnx-int4-planned+calibration")  # issue 29's rows, judged at <= the anchor's bytes
ANCHOR = "llama.cpp-Q4_0+imatrix"


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


def engines(args, calibration: Path, sizes: dict):
    """(label, opener) of every row: edgeq ONNX bundles, llama.cpp's own GGUF files, the plan within the anchor's weight
    bytes (`sizes` holds the rows' weight bytes measured so far), optionally the genai graph."""
    rows = {"onnx-fp32": dict(precision="fp32"), "onnx-int8": dict(precision="int8"),
            "onnx-int4-b32-nearest": dict(precision="int4", rounding="nearest", block_size=32),
            "onnx-int4": dict(precision="int4"),
            "onnx-int4+calibration": dict(precision="int4", calibration=calibration),
            "onnx-int4-unrotated+calibration": dict(precision="int4", calibration=calibration, rotate="off"),
            "onnx-int4-max+calibration": dict(precision="int4", calibration=calibration, effort="max")}
    for label, options in rows.items():
        if args.rows is None or label in args.rows:
            yield label, lambda o=options, l=label: open_bundle(args, args.work / l, **o)
    files = anchors.llamacpp_files(args.model, args.work, ["Q8_0", "Q4_0"], calibration, args.calibration_tokens, args.threads)
    for name in ("Q8_0", "Q4_0", "Q4_0+imatrix"):
        size = sum(t["bytes"] for t in harness.gguf_types(files[name])["tensors"].values())
        yield f"llama.cpp-{name}", lambda f=files[name], n=size: (harness.gguf_engine(f, args.threads, args.ctx), n)
    if args.rows is None or JUDGED[1] in args.rows:
        yield JUDGED[1], lambda: planned_bundle(args, calibration, sizes)
    if args.genai:
        yield "genai-int4", lambda: (genai_graph(args), None)


def genai_graph(args) -> GenaiGraph:
    out = args.work / "genai-int4"
    subprocess.run(anchors.genai_builder_command(args.model, out, args.work / "genai-cache"), check=True, capture_output=True)
    return GenaiGraph(out, args.threads)


def planned_bundle(args, calibration: Path, sizes: dict):
    """A plan within the anchor's weight bytes. `size` bounds the bundle on disk, so it is the anchor's weights plus what
    the default int4 bundle holds beside its weights (tokenizer, graph, manifest). A plan's file pads its arrays
    differently from the default's, so where its weights still land over the anchor's it is exported once more, smaller
    by the excess (its sensitivity cached), as a user would."""
    default = args.work / JUDGED[0]
    size = sizes[ANCHOR] + sum(f.stat().st_size for f in default.rglob("*") if f.is_file()) - sizes[JUDGED[0]]
    for attempt in range(2):
        out = args.work / f"{JUDGED[1]}-{attempt}"
        engine, weights = open_bundle(args, out, calibration=calibration, size=size)
        if weights <= sizes[ANCHOR]:
            break
        print(f"  its weights are {weights - sizes[ANCHOR]:,} B over the anchor's: --size {size:,} -> {size - weights + sizes[ANCHOR]:,}")
        size -= weights - sizes[ANCHOR]
    return engine, weights


def open_bundle(args, out: Path, **options):
    start = time.perf_counter()
    bundle = edgeq.export(args.model, format="onnx", output=out, eval_tokens=0, progress=False,
                          calibration_tokens=args.calibration_tokens, **options)
    print(f"  {out.name}: exported in {time.perf_counter() - start:.0f} s", flush=True)
    weights = sum(t["bytes"] for t in edgeq.inspect(bundle)["tensors"].values())
    return harness.bundle_engine(bundle, args.threads, args.ctx), weights


def main() -> None:
    ap = harness.arguments(__doc__, tokens=4096, ctx=512, calibration_tokens=8192, work="edgeq-bench-onnx-quality")
    ap.add_argument("--genai", action="store_true", help="also score onnxruntime-genai's builder int4 graph")
    ap.add_argument("--rows", nargs="+", metavar="ROW", help="only these edgeq rows (e.g. onnx-fp32 onnx-int4+calibration "
                    "onnx-int4-planned+calibration); default: all")
    args = harness.parse(ap, fresh_work=True)

    reference = harness.Reference(args.model, args.text, args.tokens, args.ctx, args.threads)
    results, sizes = {}, {}
    for label, opener in engines(args, harness.text_tail(args.text, args.work), sizes):
        engine, sizes[label] = opener()
        q = results[label] = reference.score(engine)
        weights = f"{sizes[label]:>14,} B" if sizes[label] else ""
        print(f"{label:26s} KL {q.kl:.6f}  top-1 {q.top1:.4f}  ppl {q.ppl:.3f} (ref {q.ppl_ref:.3f}) {weights}", flush=True)

    verdicts = harness.Verdicts()
    if (fp32 := results.get("onnx-fp32")) is not None:
        verdicts.check(fp32.kl < 1e-4 and fp32.top1 >= 0.999, f"fp32 KL {fp32.kl:.2e} < 1e-4, top-1 {fp32.top1:.4f} >= 0.999")
    for ours, theirs, bar in RATIOS:
        if ours in results and theirs in results:
            ratio = results[ours].kl / results[theirs].kl
            if bar:
                verdicts.at_most(f"{ours} KL / {theirs} KL", ratio, bar)
            else:
                verdicts.info(f"{ours} KL / {theirs} KL = {ratio:.3f}")
    for ours in (row for row in JUDGED if row in results):
        ratio, size = results[ours].kl / results[ANCHOR].kl, sizes[ours] / sizes[ANCHOR]
        text = f"issue 29: {ours} KL / {ANCHOR} KL at {size:.3f}x its weight bytes"
        if size <= 1.0:
            verdicts.at_most(text, ratio, 0.5)
        else:
            verdicts.info(f"{text} = {ratio:.3f} (larger: not judged)")
    print(f"({reference.describe(args.text)}; calibration: the last 200k characters of it, "
          f"{args.calibration_tokens} tokens, disjoint from the windows)")
    verdicts.exit()


if __name__ == "__main__":
    main()
