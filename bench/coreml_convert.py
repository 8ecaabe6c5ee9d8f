"""Core ML export: what converting costs on a 1.5B-shaped model, and what compression costs in quality.

Default (cost): `edgeq.export(..., format="coreml", precision="int4", eval_tokens=0)` of the random
Qwen2.5-1.5B-shaped checkpoint that gguf_export_cost.py makes (bf16, tied embeddings), run as its
own process under /usr/bin/time -v (exact peak RSS). The anchor, in the same run, is edgeq's GGUF
Q4_0 export of the same checkpoint. Bars (issue 4): peak RSS <= 16 GiB; int4 package within 10% of
parameters x 0.5 bytes + one fp16 scale per 32 weights.

--quality: on the off-grid SmolLM2 copy and wikitext-2, every scored by edgeq's evaluator against
the torch reference on the same windows: (a) edgeq's torch decoder vs HF (bar KL < 1e-4, top-1 >=
0.999); (c) Core ML int8 / int4 / palettize6 / palettize4 read back from the package
(`coreml-torch`) vs llama.cpp Q8_0 / Q4_0 GGUF (bars: int8 KL <= 1.5x Q8_0's, int4 KL <= Q4_0's).

    python bench/coreml_convert.py [--runs 1]
    python bench/coreml_convert.py --quality [--precisions int8 int4 palettize6 palettize4]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import anchors
from gguf_export_cost import DEFAULT_MODEL, warm

OFFGRID = Path("~/.cache/edgeq/models/smollm2-135m-instruct-offgrid").expanduser()
WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt")
EXPORT = ("import sys, edgeq; edgeq.export(sys.argv[1], format=sys.argv[3], precision=sys.argv[4], output=sys.argv[2], "
          "eval_tokens=0, progress=False)")
RSS_BAR_MIB = 16 * 1024


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _export_cost(model: Path, work: Path, fmt: str, precision: str) -> tuple[anchors.Run, Path]:
    bundle = work / f"{fmt}-{precision}"
    shutil.rmtree(bundle, ignore_errors=True)
    run = anchors.run([sys.executable, "-c", EXPORT, str(model), str(bundle), fmt, precision], log=work / f"{fmt}.log")
    return run, bundle


def cost(model: Path, work: Path, runs: int) -> None:
    if not (model / "config.json").is_file():
        print(f"making the 1.5B-shaped model at {model} (once)")
        subprocess.run([sys.executable, str(Path(__file__).with_name("gguf_export_cost.py")), "--make-model", "--model", str(model)], check=True)
    work.mkdir(parents=True, exist_ok=True)
    warm(model)
    best = {}
    for i in range(runs):
        for fmt, precision in (("gguf", "Q4_0"), ("coreml", "int4")):
            run, bundle = _export_cost(model, work, fmt, precision)
            manifest = json.loads((bundle / "edgeq.json").read_text())
            file_bytes = _size(bundle / manifest["model_file"])
            params = sum(_numel(t["shape"]) for t in manifest["tensors"].values())
            print(f"run {i + 1} {fmt:<7}{precision:<6}{run.wall_s:8.1f} s {run.peak_rss_mib:9.0f} MiB peak "
                  f"{file_bytes / 2**20:8.0f} MiB file  {params / 1e9:.3f} B params")
            prev = best.get(fmt)
            best[fmt] = (min(run.wall_s, prev[0]) if prev else run.wall_s, min(run.peak_rss_mib, prev[1]) if prev else run.peak_rss_mib,
                         file_bytes, params, manifest["mismatches"])
            shutil.rmtree(bundle)
    wall, rss, size, params, mismatches = best["coreml"]
    expected = params * 0.5 + params / 32 * 2
    print(f"[{'PASS' if rss <= RSS_BAR_MIB else 'FAIL'}] Core ML int4 peak RSS {rss / 1024:.2f} GiB (bar <= 16 GiB); "
          f"{rss / best['gguf'][1]:.2f}x edgeq's GGUF Q4_0 export")
    print(f"[info] Core ML int4 wall {wall:.0f} s = {wall / best['gguf'][0]:.2f}x edgeq's GGUF Q4_0 export ({best['gguf'][0]:.0f} s)")
    print(f"[{'PASS' if abs(size / expected - 1) <= 0.10 else 'FAIL'}] int4 package {size / 2**20:.0f} MiB = "
          f"{size / expected:.3f}x params*0.5 + scales ({expected / 2**20:.0f} MiB; bar within 10%); {len(mismatches)} mismatches")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def decoder_vs_hf(model: Path, tokens: int, ctx: int) -> None:
    """(a): edgeq's export decoder (float32) against the HF model, on the same windows."""
    import torch

    from edgeq.decoder import DecoderSpec, build_decoder
    from edgeq.evaluate import compare
    from edgeq.importance import calibration_windows
    from edgeq.intake import open_model
    from edgeq.runtimes.torch import TorchEngine

    class DecoderEngine:
        def __init__(self, source):
            self.decoder = build_decoder(DecoderSpec.from_source(source, ctx), source.tensor)

        def score(self, ids):
            self.decoder.reset()
            with torch.inference_mode():
                return self.decoder(torch.tensor([ids]), torch.arange(len(ids)).view(1, -1))[0].numpy()

    source = open_model(model)
    windows = calibration_windows(source.chat_tokenizer(), WIKITEXT, tokens, ctx)
    quality = compare(TorchEngine(source), DecoderEngine(source), windows)
    ok = quality.kl < 1e-4 and quality.top1 >= 0.999
    print(f"[{'PASS' if ok else 'FAIL'}] decoder vs HF (fp32): KL {quality.kl:.2e} top-1 {quality.top1:.4f} (bar KL < 1e-4, top-1 >= 0.999)")


def quality(model: Path, work: Path, precisions: list[str], tokens: int, ctx: int) -> None:
    import edgeq

    decoder_vs_hf(model, tokens, ctx)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for fmt, precision in [("gguf", "Q8_0"), ("gguf", "Q4_0")] + [("coreml", p) for p in precisions]:
        bundle = work / f"{model.name}-{fmt}-{precision}"
        if not (bundle / "edgeq.json").is_file():
            edgeq.export(model, format=fmt, precision=precision, output=bundle, eval_tokens=0, overwrite=True)
        q = edgeq.evaluate(bundle, text=WIKITEXT, tokens=tokens, ctx=ctx, backend="coreml-torch" if fmt == "coreml" else None)
        manifest = edgeq.inspect(bundle)
        results[precision] = q.kl
        print(f"  {fmt:<7}{precision:<11} KL {q.kl:.5f}  top-1 {q.top1:.4f}  ppl {q.ppl:.3f} (ref {q.ppl_ref:.3f})  "
              f"{manifest['bits_per_weight']:.2f} bpw  {_size(bundle / manifest['model_file']) / 2**20:.1f} MiB")
    if "int8" in results:
        ratio = results["int8"] / results["Q8_0"]
        print(f"[{'PASS' if ratio <= 1.5 else 'FAIL'}] int8 KL / Q8_0 KL = {ratio:.3f} (bar <= 1.5)")
    if "int4" in results:
        ratio = results["int4"] / results["Q4_0"]
        print(f"[{'PASS' if ratio <= 1.0 else 'FAIL'}] int4 KL / Q4_0 KL = {ratio:.3f} (bar <= 1.0)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", action="store_true", help="quality bars on the off-grid SmolLM2 instead of the 1.5B cost")
    ap.add_argument("--model", type=Path, help=f"default: {DEFAULT_MODEL} (cost) or {OFFGRID} (--quality)")
    ap.add_argument("--runs", type=int, default=1, help="cost runs; the best wall time and peak count")
    ap.add_argument("--precisions", nargs="+", default=["int8", "int4", "palettize6", "palettize4"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeq-bench-coreml"))
    args = ap.parse_args()
    if args.quality:
        quality(args.model or OFFGRID, args.work, args.precisions, args.tokens, args.ctx)
    else:
        cost(args.model or DEFAULT_MODEL, args.work, args.runs)


if __name__ == "__main__":
    main()
