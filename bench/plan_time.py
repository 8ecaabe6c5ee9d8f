"""How long planning takes on a 1.5B-shaped model (issue 5 bars): cold cache ≤ 15 min, re-plan ≤ 10 s.

Cold: sensitivity measured from nothing (importance matrix, proxies for every tensor at every
candidate precision, measured KL on a sample), in a fresh cache folder. Warm: the same model
planned for another device, from the cache. Peak RSS is the process's own high-water mark.
The model is the random checkpoint with Qwen2.5-1.5B's shapes (`shape-qwen2`, made once by
real_models.py); planning cost does not depend on the weights' values.

    python bench/plan_time.py [--model shape-qwen2] [--format gguf]
"""
from __future__ import annotations

import os
import resource
import tempfile
import time

import harness

import edgeq

BARS = {"cold": 15 * 60, "warm": 10}


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
    for name, seconds in (("cold", cold), ("warm", warm)):
        verdicts.at_most(f"{name} plan seconds", seconds, BARS[name], ".1f")
    verdicts.exit()


if __name__ == "__main__":
    main()
