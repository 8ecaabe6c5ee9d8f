"""llama.cpp's quantized KV cache at long context: what it costs, and whether edgeq's planner predicts it.

The model is exported once to GGUF Q8_0 (so the weights add little error of their own) and scored by
llama.cpp on the same long windows of held-out text with each cache type (`type_k`/`type_v` f16, q8_0,
q4_0; flash attention on for the quantized ones, as llama.cpp requires). For each type it prints:
- the KL of that run against llama.cpp's own f16-cache run (the cache's own error, measured),
- the KL that edgeq's planner predicts for it (`edgeq.quant.kv_cache`: the float model with a cache rounded
  to the type's blocks, on the same window),
- the KL against the torch reference (weights and cache together), and the cache's MiB at the window length.
The bar: the prediction is within 1.5× of llama.cpp's measurement for every quantized type (the planner adds it
to the weights' predicted KL; the plan's own bar is 1.3× on the total, where the cache is a small part).

    python bench/kv_cache.py [--model qwen-coder-perm] [--tokens 4096] [--ctx 2048]
"""
from __future__ import annotations

import numpy as np
from lib import harness

from edgeq import registry
from edgeq.quality import QualityAccumulator
from edgeq.model_shape import ModelShape
from edgeq.quant.kv_cache import measure_kv_error

BAR = 1.5


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
    print(f"{'cache':<7}{'MiB':>8}{'KL vs f16 cache':>17}{'predicted':>11}{'ratio':>8}{'KL vs torch':>13}")
    for cache_type, logits in runs.items():
        mib = shape.kv_cache_bytes(reference.ctx, spec.kv_cache_types[cache_type]) / 2**20
        measured = float(np.mean([kl(f, q) for f, q in zip(runs["f16"], logits)]))
        total = float(np.mean([kl(np.array(r), q) for r, q in zip(reference.logits, logits)]))
        guess = float(np.mean([p[cache_type] for p in predicted])) if cache_type != "f16" else 0.0
        ratio = guess / measured if measured > 0 else float("nan")
        print(f"{cache_type:<7}{mib:>8.1f}{measured:>17.6f}{guess:>11.6f}{ratio:>8.2f}{total:>13.6f}", flush=True)
        if cache_type != "f16":
            verdicts.check(1 / BAR <= ratio <= BAR, f"{cache_type}: predicted / measured KL = {ratio:.2f} (bar within {BAR}x)")
    verdicts.exit()


if __name__ == "__main__":
    main()
