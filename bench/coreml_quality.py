"""What Core ML compression costs in quality, against llama.cpp's own Q8_0 / Q4_0 on the same checkpoint.

Core ML cannot predict on Linux, so the Core ML side is measured the way `edgeq eval --backend
coreml-torch` does it: the weights are read back out of the exported `.mlpackage`, dequantized as
stored, and run in edgeq's torch decoder (float32). llama.cpp's side is its own pipeline
(convert_hf_to_gguf.py --outtype f16, then llama-quantize), run by llama.cpp. Every candidate is
scored by edgeq's evaluator against the same torch reference logits on the same wikitext windows.

`int4` is the default export (least-squares blocks, the head at int8); `int4-gptq` is `--rounding gptq` on
edgeq's built-in calibration text (the head at int4 too): neither sees the windows' text, as Q4_0 does not.

Bars (issues 4, 13): the export decoder vs HF KL < 1e-4 and top-1 >= 0.999 (fp32); int8 per-channel KL
<= 1.5 x Q8_0's; int4 and int4-gptq KL <= Q4_0's; each int4 package within 10% of the bytes its tensors hold as
read back (int4: 0.5 byte + an fp16 scale and an int4 zero point per block; int8: 1 byte + an fp16 scale
per row), and every tensor of the type asked.

    LLAMA_CPP_BIN=... LLAMA_CPP_SRC=... python bench/coreml_quality.py [--model qwen-coder] [--precisions int8 int4 int4-gptq palettize6]
"""
from __future__ import annotations

from pathlib import Path

from lib import anchors
from lib import harness
import torch

import edgeq

BARS = {"int8": ("Q8_0", 1.5), "int4": ("Q4_0", 1.0), "int4-gptq": ("Q4_0", 1.0)}


def coreml_bundles(model: Path, work: Path, candidates: list[str]) -> dict[str, Path]:
    """A candidate is a precision, or one with `-gptq`: rounded by GPTQ on the built-in calibration text."""
    return {c: edgeq.export(model, format="coreml", precision=c.removesuffix("-gptq"), output=work / f"coreml-{c}",
                            overwrite=True, eval_tokens=0, progress=False, **({"rounding": "gptq"} if c.endswith("-gptq") else {}))
            for c in candidates}


def check_size(name: str, bundle: Path, verdicts: harness.Verdicts) -> None:
    manifest = edgeq.inspect(bundle)
    expected = sum(t["bytes"] for t in manifest["tensors"].values())  # read back: data, scales and zero points as stored
    size = harness.folder_bytes(bundle / manifest["model_file"])
    ratio = size / expected
    types = sorted({t["type"] for t in manifest["tensors"].values() if len(t["shape"]) == 2})
    verdicts.check(abs(ratio - 1) <= 0.10 and not manifest["mismatches"], f"{name} package {size / 2**20:.1f} MiB = {ratio:.3f} x its tensors' bytes "
                   f"({', '.join(types)}: {expected / 2**20:.1f} MiB; bar within 10%), "
                   f"{manifest['bits_per_weight']:.3f} bits/weight, {len(manifest['mismatches'])} mismatches")


def main() -> None:
    ap = harness.arguments(__doc__, tokens=4096, ctx=512, work="edgeq-bench-coreml-quality")
    ap.add_argument("--precisions", nargs="+", default=["int8", "int4", "int4-gptq"])
    args = harness.parse(ap, fresh_work=True)
    torch.set_num_threads(args.threads)

    theirs = anchors.llamacpp_files(args.model, args.work, ["Q8_0", "Q4_0"], None, 0, args.threads)
    ours = coreml_bundles(args.model, args.work, args.precisions)
    reference = harness.Reference(args.model, args.text, args.tokens, args.ctx, args.threads)
    print(reference.describe(args.text))

    verdicts = harness.Verdicts()
    q = reference.score(harness.ExportDecoder(reference.source, args.ctx))
    verdicts.check(q.kl < 1e-4 and q.top1 >= 0.999,
                   f"export decoder vs HF (fp32): KL {q.kl:.2e}, top-1 {q.top1:.4f} (bar KL < 1e-4, top-1 >= 0.999)")
    kl = {name: reference.score(harness.gguf_engine(path, args.threads, reference.ctx)) for name, path in theirs.items() if name != "F16"}
    kl.update({p: reference.score(harness.bundle_engine(bundle, args.threads, args.ctx)) for p, bundle in ours.items()})
    for name, q in kl.items():
        print(f"  {name:<11} KL {q.kl:.5f}  top-1 {q.top1:.4f}  ppl {q.ppl:.3f} (ref {q.ppl_ref:.3f})")
    for precision, (anchor, bar) in BARS.items():
        if precision in kl:
            verdicts.at_most(f"Core ML {precision} KL / llama.cpp {anchor} KL", kl[precision].kl / kl[anchor].kl, bar)
    for name in ("int4", "int4-gptq"):
        if name in ours:
            check_size(name, ours[name], verdicts)
    verdicts.exit()


if __name__ == "__main__":
    main()
