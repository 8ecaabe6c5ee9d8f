"""edgeq's ExecuTorch 8da4w `.pte` against optimum-executorch's 8da4w export of the same model: KL, top-1 and perplexity
against the torch reference on the same tokens, bytes, and prefill/decode tokens/s of both programs through ExecuTorch's
runtime (same kernels, same threadpool size) in this one process.

The anchor is optimum-executorch's own recipe for SmolLM2 (its README): `optimum-cli export executorch --task
text-generation --recipe xnnpack --use_custom_sdpa --use_custom_kv_cache --qlinear 8da4w --qembedding 8w`, plus
`--max_seq_len` = edgeq's context for the model, so both static caches are the same length. That is torchao's
Int8DynamicActivationIntxWeightConfig (int4, groups of 32, HQQ scale-only qparams) on every nn.Linear whose width 32
divides, the untied lm_head included; the embedding table 8-bit per row (IntxWeightOnlyConfig); the rest float32;
lowered to XNNPACK. optimum-executorch pins a transformers release candidate (1.1.0: transformers==5.0.0rc1), so it
lives in a venv of its own: --optimum-cli names that venv's optimum-cli (the bench runs the export), or --anchor-pte
an export made before.

edgeq's row is its default 8da4w export (GPTQ on the built-in calibration text, 8-bit head, 4-bit embedding lookup),
made once per edgeq code version. Both `.pte` are scored on the Reference's windows, each fed in the largest calls its
signature takes (read from the program). Speed: alternating rounds of a 128-token prefill then 64 one-token steps,
medians.

Bars (issue 30): edgeq 8da4w KL <= 0.7x the anchor's; decode >= 1.0x the anchor's on the same runtime and threads.

    python bench/executorch_anchor.py --optimum-cli /work/venv-optimum/bin/optimum-cli [--model smollm2] [--threads 2]

Measured numbers: see bench/README.md.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from lib import harness
from lib import pte
import numpy as np

RECIPE = ["--task", "text-generation", "--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache",
          "--qlinear", "8da4w", "--qembedding", "8w"]


def optimum_export(cli: Path, model: Path, out: Path, context: int) -> Path:
    run = harness.timed_process([str(cli), "export", "executorch", "--model", str(model), *RECIPE,
                                 "--max_seq_len", str(context), "--output_dir", str(out)], log=out.parent / "optimum-export.log")
    harness.Verdicts.info(f"optimum-executorch export: {run.wall_s:.0f} s, peak RSS {run.peak_rss_mib:.0f} MiB")
    return out / "model.pte"


def speed(engine: pte.ProgramEngine, prompt: int = 128, steps: int = 64) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s): a `prompt`-token prefill from an empty cache, then `steps` one-token forwards (the
    ids are a fixed ramp: speed, not quality)."""
    engine.reset()
    started = time.perf_counter()
    engine.forward(list(range(100, 100 + prompt)))
    prefill = prompt / (time.perf_counter() - started)
    started = time.perf_counter()
    for t in range(steps):
        engine.forward([300 + t])
    return prefill, steps / (time.perf_counter() - started)


def main() -> None:
    ap = harness.arguments(__doc__, tokens=2048, ctx=512, calibration_tokens=4096, work="edgeq-bench-executorch-anchor")
    ap.add_argument("--optimum-cli", type=Path, help="optimum-cli of a venv with optimum-executorch (the bench exports the anchor)")
    ap.add_argument("--anchor-pte", type=Path, help="an optimum-executorch 8da4w model.pte exported before (instead of --optimum-cli)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of prefill + decode per program")
    args = harness.parse(ap)
    if not (args.optimum_cli or args.anchor_pte):
        raise SystemExit("give --optimum-cli (a venv's optimum-cli with optimum-executorch) or --anchor-pte")
    reference = harness.Reference(args.model, args.text, args.tokens, args.ctx, args.threads)
    bundle = harness.export_once(args.model, args.work / "edgeq-8da4w", format="executorch", precision="8da4w",
                                 calibration_tokens=args.calibration_tokens)
    context = json.loads((bundle / "edgeq.json").read_text())["executorch"]["context"]
    anchor = args.anchor_pte or optimum_export(args.optimum_cli, args.model, args.work / "optimum-8da4w", context)

    rt = pte.runtime(args.threads)
    engines = {"edgeq": pte.ProgramEngine(rt, bundle / "model.pte"), "optimum": pte.ProgramEngine(rt, anchor)}
    results = {}
    for name, engine in engines.items():
        q = reference.score(engine)
        size = engine.path.stat().st_size
        results[name] = (q, size)
        print(f"{name:8s} {engine.signature.describe()}\n{'':8s} KL {q.kl:.6f}  top-1 {q.top1:.4f}  ppl {q.ppl:.3f} "
              f"(ref {q.ppl_ref:.3f})  {size:,} B ({size / 2**20:.1f} MiB)", flush=True)
    timed = harness.medians(harness.alternating({name: (lambda e=e: speed(e)) for name, e in engines.items()}, args.rounds))
    harness.table({"prefill tok/s": ">15.1f", "decode tok/s": ">14.1f"}, timed, label_width=10)

    verdicts = harness.Verdicts()
    (ours, our_size), (theirs, their_size) = results["edgeq"], results["optimum"]
    verdicts.at_most("edgeq 8da4w KL / optimum-executorch 8da4w KL", ours.kl / theirs.kl, 0.7)
    verdicts.at_least("edgeq 8da4w decode / optimum-executorch 8da4w decode", timed["edgeq"][1] / timed["optimum"][1], 1.0)
    verdicts.info(f"prefill ratio {timed['edgeq'][0] / timed['optimum'][0]:.3f}x, size ratio {our_size / their_size:.3f}x, "
                  f"top-1 {ours.top1:.4f} vs {theirs.top1:.4f}")
    print(f"({reference.describe(args.text)}; threads {args.threads} (ExecuTorch's threadpool); context {context}; "
          f"{args.rounds} alternating rounds of a 128-token prefill + 64 decode steps, medians)")
    verdicts.exit()


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
