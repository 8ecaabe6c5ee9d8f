"""How long planning takes on a 1.5B-shaped model (issue 5 bars): cold cache ≤ 15 min, re-plan ≤ 10 s.

Cold: sensitivity measured from nothing (importance matrix, proxies for every tensor at every
candidate precision, measured KL on a sample), in a fresh cache folder. Warm: the same model
planned for another device, from the cache. Peak RSS is the process's own high-water mark.
The model is bench/gguf_export_cost.py's random checkpoint with Qwen2.5-1.5B's shapes (made once);
planning cost does not depend on the weights' values.

    python bench/plan_time.py [--model DIR] [--format gguf]
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARS = {"cold": 15 * 60, "warm": 10}
HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("~/.cache/edgeq/models/bench-qwen2-1.5b-shape").expanduser())
    ap.add_argument("--format", default="gguf", help="gguf, onnx or coreml")
    ap.add_argument("--devices", default="x86-64-laptop,raspberry-pi-5", help="first plans cold, second warm")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE / "gguf_export_cost.py"), "--make-model", "--arch", "qwen2", "--model", str(args.model)], check=True)
    os.environ["EDGEQ_CACHE"] = tempfile.mkdtemp(prefix="edgeq-plan-time-")  # cold: nothing cached
    import edgeq

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
    for name, seconds in (("cold", cold), ("warm", warm)):
        print(f"[{'PASS' if seconds <= BARS[name] else 'FAIL'}] {name} plan {seconds:.1f} s (bar <= {BARS[name]} s)")


if __name__ == "__main__":
    main()
