"""How long planning takes at the users' model size (issue 13 bars): cold cache ≤ 8 min at 1.5B (≤ 15 at 3B),
re-plan ≤ 5 s, peak RSS ≤ 12 GiB.

Cold: sensitivity measured from nothing (importance matrix, proxies for every tensor at every
candidate precision, measured KL on a sample), in a fresh cache folder. Warm: the same model
planned for another device, from the cache. Peak RSS is the process's own high-water mark.
The model is the random checkpoint with Qwen2.5-1.5B's shapes (`shape-qwen2`, made once by
lib/real_models.py); planning cost does not depend on the weights' values.

    python bench/plan_time.py [--model shape-qwen2] [--format gguf]
"""
from __future__ import annotations

import os
import resource
import tempfile
import time

from lib import harness

import edgeq

BARS = {"cold": 8 * 60, "cold at 3B": 15 * 60, "warm": 5, "peak RSS GiB": 12}


def main() -> None:
    ap = harness.arguments(__doc__, model="shape-qwen2", text=False, threads=None)
    ap.add_argument("--format", default="gguf", help="gguf, onnx or coreml")
    ap.add_argument("--devices", default="x86-64-laptop,raspberry-pi-5", help="first plans cold, second warm")
    args = harness.parse(ap)
    os.environ["EDGEQ_CACHE"] = tempfile.mkdtemp(prefix="edgeq-plan-time-")  # cold: nothing cached

    first, second = args.devices.split(",")
    start = time.perf_counter()
    plan = edgeq.plan(args.model, device=first, format=args.format)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    edgeq.plan(args.model, device=second, format=args.format)
    warm = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.model.name} ({args.format}): {len(plan.entries)} tensors, "
          f"{plan.sensitivity['measured_tensors']} measured, proxy rank correlation {plan.sensitivity['proxy_rank_correlation']}")
    print(f"peak RSS {peak:.1f} GiB")
    verdicts = harness.Verdicts()
    at_3b = harness.parameters(args.model) > 2.5e9
    verdicts.at_most("cold plan seconds", cold, BARS["cold at 3B" if at_3b else "cold"], ".1f")
    verdicts.at_most("warm plan seconds", warm, BARS["warm"], ".1f")
    verdicts.at_most("peak RSS GiB", peak, BARS["peak RSS GiB"], ".1f")
    verdicts.exit()


if __name__ == "__main__":
    main()
