"""llama.cpp's quantized KV cache at long context: what it costs, and whether edgeq's planner predicts it.

The model is exported once to GGUF Q8_0 (so the weights add little error of their own) and scored by
llama.cpp on the same long windows of held-out text with each cache type (`type_k`/`type_v` f16, q8_0,
q4_0; flash attention on for the quantized ones, as llama.cpp requires). For each type it prints:
- the KL against the torch reference (weights and cache together), and what the cache adds to the f16 cache's
  (the cache's own error as the plan counts it: added to the weights'),
- the KL that edgeq's planner predicts for it (`edgeq.quant.kv_cache`: the float model with a cache rounded
  to the type's blocks in llama.cpp's rotated basis, on the same window),
- the KL of that run against llama.cpp's own f16-cache run, and the cache's MiB at the window length.
The bar, in the plan's own terms (its prediction of the total is to hold within 1.3×): for every quantized type,
the prediction misses what the cache adds by at most a tenth of the run's whole KL. (A ratio is printed too; for
q8_0 both numbers are tiny, and llama.cpp's rounding of the queries to q8_0 in its dot product, which the
simulation leaves out, is a large part of them.)

    python bench/kv_cache.py [--model qwen-coder-perm] [--tokens 4096] [--ctx 2048]
"""
from __future__ import annotations

import numpy as np
from lib import harness

from edgeq import registry
from edgeq.quality import QualityAccumulator
from edgeq.model_shape import ModelShape
from edgeq.quant.kv_cache import measure_kv_error

BAR = 0.1  # largest miss of the cache's predicted KL, as a share of the run's whole KL against torch


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    acc = QualityAccumulator()
    acc.add(p_logits, q_logits, list(range(len(p_logits))))
    return acc.result(ctx=len(p_logits)).kl


def main() -> None:
    ap = harness.arguments(__doc__, model="qwen-coder-perm", tokens=4096, ctx=2048, threads=2, work="edgeq-bench-kv-cache")
    args = harness.parse(ap)
    bundle = harness.exported(args.model, args.work, "gguf", "Q8_0")
    reference = harness.Reference(args.model, args.text, args.tokens, args.ctx, args.threads)
    source, spec = reference.source, registry.formats.get("gguf")
    shape = ModelShape.from_config(source.config)
    print(f"{reference.describe(args.text)}, threads {args.threads}; weights GGUF Q8_0", flush=True)
    engine_cls = registry.runtimes.get("llamacpp")
    runs = {}
    for cache_type in spec.kv_cache_types:
        engine = engine_cls(bundle / "model.gguf", threads=args.threads, n_ctx=reference.ctx, kv_cache=cache_type)
        try:
            runs[cache_type] = [engine.score(w) for w in reference.windows]
        finally:
            engine.close()
    model = harness.torch_engine(args.model, args.threads)
    quantized = [t for t in spec.kv_cache_types if t != "f16"]
    predicted = [measure_kv_error(model.model, w, quantized) for w in reference.windows]
    model.close()
    verdicts = harness.Verdicts()
    print(f"{'cache':<7}{'MiB':>8}{'KL vs torch':>13}{'added':>10}{'predicted':>11}{'ratio':>8}{'KL vs f16 cache':>17}")
    totals = {t: float(np.mean([kl(np.array(r), q) for r, q in zip(reference.logits, logits)])) for t, logits in runs.items()}
    for cache_type, logits in runs.items():
        mib = shape.kv_cache_bytes(reference.ctx, spec.kv_cache_types[cache_type]) / 2**20
        between = float(np.mean([kl(f, q) for f, q in zip(runs["f16"], logits)]))
        added = totals[cache_type] - totals["f16"]
        guess = float(np.mean([p[cache_type] for p in predicted])) if cache_type != "f16" else 0.0
        ratio = guess / added if added > 0 else float("nan")
        print(f"{cache_type:<7}{mib:>8.1f}{totals[cache_type]:>13.6f}{added:>10.6f}{guess:>11.6f}{ratio:>8.2f}{between:>17.6f}", flush=True)
        if cache_type != "f16":
            miss = abs(guess - added) / totals[cache_type]
            verdicts.at_most(f"{cache_type}: |predicted - added| / whole KL", miss, BAR)
    verdicts.exit()


if __name__ == "__main__":
    main()
