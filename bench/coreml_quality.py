"""What Core ML compression costs in quality, against llama.cpp's own Q8_0 / Q4_0 on the same checkpoint.

Core ML cannot predict on Linux, so the Core ML side is measured the way `edgeq eval --backend
coreml-torch` does it: the weights are read back out of the exported `.mlpackage`, dequantized as
stored, and run in edgeq's torch decoder (float32). llama.cpp's side is its own pipeline
(convert_hf_to_gguf.py --outtype f16, then llama-quantize), run by llama.cpp. Every candidate is
scored by edgeq's evaluator against the same torch reference logits on the same wikitext windows.

Bars (issue 4): the export decoder vs HF KL < 1e-4 and top-1 >= 0.999 (fp32); int8 per-channel KL
<= 1.5 x Q8_0's; int4 per-block-32 KL <= Q4_0's; the int4 package within 10% of parameters x 0.5
bytes + one float16 scale per block of 32.

    LLAMA_CPP_BIN=... LLAMA_CPP_SRC=... python bench/coreml_quality.py [--precisions int8 int4 palettize6]
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from gguf_quality import DEFAULT_MODEL, DEFAULT_TEXT, llamacpp_files, measure

import edgeq
from edgeq.decoder import DecoderSpec, build_decoder
from edgeq.evaluate import QualityAccumulator
from edgeq.importance import calibration_windows
from edgeq.intake import open_model
from edgeq.runtimes.coreml import CoreMLTorchEngine
from edgeq.runtimes.torch import TorchEngine

BARS = {"int8": ("Q8_0", 1.5), "int4": ("Q4_0", 1.0)}


def score(engine, reference: list, windows: list[list[int]]):
    acc = QualityAccumulator()
    for ref_logits, window in zip(reference, windows):
        acc.add(ref_logits, engine.score(window), window)
    return acc.result(ctx=len(windows[0]))


class DecoderEngine:
    """edgeq's export decoder at float32 with the source weights: what the converter traces."""

    def __init__(self, source, ctx: int):
        self.decoder = build_decoder(DecoderSpec.from_source(source, ctx), source.tensor)

    def score(self, ids):
        self.decoder.reset()
        with torch.inference_mode():
            return self.decoder(torch.tensor([ids]), torch.arange(len(ids)).view(1, -1))[0].numpy()


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def coreml_bundles(model: Path, work: Path, precisions: list[str]) -> dict[str, Path]:
    return {p: edgeq.export(model, format="coreml", precision=p, output=work / f"coreml-{p}", overwrite=True,
                            eval_tokens=0, progress=False) for p in precisions}


def report_size(bundle: Path) -> None:
    manifest = edgeq.inspect(bundle)
    params = sum(int(torch.tensor(t["shape"]).prod()) for t in manifest["tensors"].values())
    expected = params * 0.5 + params / 32 * 2
    size = package_bytes(bundle / manifest["model_file"])
    ratio = size / expected
    print(f"[{'PASS' if abs(ratio - 1) <= 0.10 else 'FAIL'}] int4 package {size / 2**20:.1f} MiB = {ratio:.3f} x "
          f"(params x 0.5 B + fp16 scale per 32 = {expected / 2**20:.1f} MiB; bar within 10%), "
          f"{manifest['bits_per_weight']:.3f} bits/weight, {len(manifest['mismatches'])} mismatches")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--precisions", nargs="+", default=["int8", "int4"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeq-bench-coreml-quality"))
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    torch.set_num_threads(args.threads)

    theirs = llamacpp_files(args.model, args.work, ["Q8_0", "Q4_0"], None, 0, args.threads)
    ours = coreml_bundles(args.model, args.work, args.precisions)
    source = open_model(args.model)
    windows = calibration_windows(source.chat_tokenizer(), args.text, args.tokens, args.ctx)
    reference = [TorchEngine(source).score(w) for w in windows]
    print(f"model {args.model.name}, {len(windows)} windows x {args.ctx} tokens of {args.text.name}")

    q = score(DecoderEngine(source, args.ctx), reference, windows)
    ok = q.kl < 1e-4 and q.top1 >= 0.999
    print(f"[{'PASS' if ok else 'FAIL'}] export decoder vs HF (fp32): KL {q.kl:.2e}, top-1 {q.top1:.4f} (bar KL < 1e-4, top-1 >= 0.999)")
    kl = {}
    for name, path in theirs.items():
        if name != "F16":
            kl[name] = measure(path, reference, windows, args.threads)
    for precision, bundle in ours.items():
        engine = CoreMLTorchEngine.open(bundle / "model.mlpackage", edgeq.inspect(bundle), n_ctx=args.ctx)
        kl[precision] = score(engine, reference, windows)
    for name, q in kl.items():
        print(f"  {name:<11} KL {q.kl:.5f}  top-1 {q.top1:.4f}  ppl {q.ppl:.3f} (ref {q.ppl_ref:.3f})")
    for precision, (anchor, bar) in BARS.items():
        if precision in kl:
            ratio = kl[precision].kl / kl[anchor].kl
            print(f"[{'PASS' if ratio <= bar else 'FAIL'}] Core ML {precision} KL / llama.cpp {anchor} KL = {ratio:.3f} (bar <= {bar})")
    if "int4" in ours:
        report_size(ours["int4"])


if __name__ == "__main__":
    main()
