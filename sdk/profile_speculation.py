"""`edgeq profile --draft`: speculative decoding measured on this machine and estimated on a device profile.

Measured (in the profiling process): replies to a built-in copying prompt (a passage to repeat, where prompt lookup
drafts well), plain and speculative alternately: tokens/s both ways (speculation as users get it, its depth adapting to
what passes cost here); then one reply drafting as deep as allowed, for the accepted tokens per verification pass and
the acceptance rate per drafted token, which say how good the drafter is whatever this machine's costs. Estimated (labelled so): the speedup on a device from that acceptance, the
model's weight bytes and parameters and the device's bandwidth and compute: a step costs the longer of reading the
weights and computing one token, a pass of w tokens the longer of reading them once and computing w tokens, so on a
bandwidth-bound device a pass costs about a step, and on a compute-bound one (this 2-core machine) several.
"""
from __future__ import annotations

import time
from importlib.resources import files

import numpy as np


def copying_prompt(chars: int = 700) -> str:
    passage = files("edgeq").joinpath("calibration_text.txt").read_text()[:chars]
    return f"Repeat the following text exactly, word for word:\n\n{passage}"


def measure(path: str, draft: str, threads: int | None, gen: int, repeat: int, n_ctx: int) -> dict:
    """Alternating plain and speculative replies (greedy) after one warm-up of each; medians of `repeat`."""
    from .loading import load

    with load(path, threads=threads, n_ctx=n_ctx, draft=draft, verify=False) as model:
        ids = model.tokenizer.prompt_ids(messages=[{"role": "user", "content": copying_prompt()}]) \
            if model.tokenizer.chat_template else model.tokenizer.encode(copying_prompt())
        ids = ids[:max(1, model.engine.n_ctx - gen)]
        runs: dict[bool, list] = {False: [], True: []}
        for rep in range(repeat + 1):
            for speculative in (False, True) if rep % 2 == 0 else (True, False):
                start = time.perf_counter()
                model.generate_ids(ids, gen, speculative=speculative)
                s = model.stats
                if rep:
                    runs[speculative].append((s.generated_tokens / (time.perf_counter() - start), s.decode_tokens_per_s, s.accepted_tokens,
                                              s.rejected_tokens, s.speculative_passes))
        spec = np.array(runs[True], dtype=float)
        model.speculation.fixed_depth = True
        model.generate_ids(ids, gen, speculative=True)
        model.speculation.fixed_depth = False
        accepted, rejected, passes = model.stats.accepted_tokens, model.stats.rejected_tokens, model.stats.speculative_passes
        return {"drafter": model.speculation.drafter.name, "draft_tokens": model.speculation.draft_tokens,
                "draft_bytes": _draft_bytes(model.speculation.drafter), "exact_width": model.speculation.exact_width,
                "plain_tokens_per_s": float(np.median([r[0] for r in runs[False]])),
                "speculative_tokens_per_s": float(np.median(spec[:, 0])),
                "accepted_per_pass": float(accepted / passes) if passes else 0.0,
                "acceptance": float(accepted / (accepted + rejected)) if accepted + rejected else 0.0,
                "passes": int(passes), "adaptive_passes": int(spec[:, 4].sum()), "prompt_tokens": len(ids), "gen": gen}


def _draft_bytes(drafter) -> int:
    from .speculative import weight_bytes

    model = getattr(drafter, "model", None)
    return weight_bytes(model) if model is not None else 0


def device_speedup(measured: dict, weight_bytes: int, params: int, bandwidth_gbps: float, gflops: float) -> dict:
    """The best depth and its estimated speedup on a device, from the measured acceptance per drafted token."""
    a = min(measured["acceptance"], 0.999)
    read = weight_bytes / (bandwidth_gbps * 1e9)
    compute = 2.0 * params / (gflops * 1e9)
    step = max(read, compute)
    draft = measured["draft_bytes"] / (bandwidth_gbps * 1e9)
    best = (0, 1.0)
    for k in range(1, measured["draft_tokens"] + 1):
        tokens = (1 - a ** (k + 1)) / (1 - a)
        speedup = tokens * step / (max(read, (k + 1) * compute) + k * draft)
        if speedup > best[1]:
            best = (k, speedup)
    return {"depth": best[0], "speedup": round(best[1], 3), "pass_over_step": round(max(read, 2 * compute) / step, 3)}


def lines(bundles) -> list[str]:
    """The text table's rows for the bundles profiled with a drafter."""
    out = []
    for b in bundles:
        s = b.speculation
        if not s:
            continue
        exact = "" if s["exact_width"] is None else f", greedy verified exactly up to {s['exact_width']} tokens per pass"
        out.append(f"{b.name}: {s['drafter']} drafting (≤ {s['draft_tokens']} per pass{exact}): plain {s['plain_tokens_per_s']:.1f} tok/s, "
                   f"speculative {s['speculative_tokens_per_s']:.1f} tok/s ({s['speculative_tokens_per_s'] / s['plain_tokens_per_s']:.2f}x), "
                   f"{s['adaptive_passes']} passes; drafting {s['draft_tokens']} deep: {s['accepted_per_pass']:.2f} accepted per pass, "
                   f"acceptance {s['acceptance']:.2f}")
        if "device" in s:
            d = s["device"]
            out.append(f"  ESTIMATE on {b.estimate.device if b.estimate else 'the device'}: {d['speedup']:.2f}x at depth {d['depth']} "
                       f"(a pass of 2 costs {d['pass_over_step']:.2f} steps there)")
    return ["", "speculative decoding on a built-in copying prompt (greedy; whole replies, prefill included):", *out] if out else []
