"""`edgeq profile` against anchors measured in the same run, on SmolLM2-135M (or --model) exported to GGUF:

  decode tok/s  vs llama.cpp's own llama-bench tg128 (at the same depth, same GGUF, same threads)  bar 5%
  prefill tok/s vs llama-bench pp512                                                                  bar 10%
  peak memory   vs the OS's accounting of the same run (/usr/bin/time -v maximum resident set)        bar 5%
  estimate      for this machine's own device profile (bandwidth and GFLOPS measured beforehand,
                in a separate process) vs what the same profile run measures                          bar 15%

llama-bench and edgeq alternate (A B A B … A); each edgeq run is compared with the mean of its two neighbours
and the median ratio over the rounds is reported, so the drift of a shared machine cancels as far as it can.

    LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin python bench/profile_vs_llama_bench.py [--threads 2]
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

from lib import anchors
from lib import harness

import edgeq
from edgeq.runtimes.llamacpp_amx import extra_buffers_usable

BARS = {"decode": 0.05, "prefill": 0.10, "peak memory": 0.05, "estimate": 0.15}
DEPTH = 64   # edgeq decodes after its shortest prompt; llama-bench measures tg128 at the same depth


def llama_bench(binary: Path, gguf: Path, threads: int, repeat: int) -> dict:
    """llama-bench's own pp512 (empty context) and tg128 (at DEPTH) tokens/s."""
    out = {}
    repack = ["--repack", "1" if extra_buffers_usable(gguf) else "0"]  # as edgeq's engine runs it (off where AMX faults)
    for name, args in (("prefill", ["-p", "512", "-n", "0"]), ("decode", ["-p", "0", "-n", "128", "-d", str(DEPTH)])):
        done = subprocess.run([str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(repeat), "-o", "json", *repack, *args],
                              capture_output=True, text=True, check=True)
        (test,) = json.loads(done.stdout)
        out[name] = test["avg_ts"]
    return out


def edgeq_profile_under_time(bundle: Path, threads: int, repeat: int, work: Path, machine: dict) -> tuple[dict, int]:
    """`edgeq profile` under /usr/bin/time -v: (its JSON, the OS's maximum RSS in bytes). /usr/bin/time takes the
    largest process of the whole tree, and a profile measures this machine's bandwidth in three processes copying
    512 MiB each after the bundle's: given the machine measured beforehand (`machine`), none runs, so the OS's figure
    covers what edgeq's does (the profiling process) and the caller's own interpreter."""
    out = work / "profile.json"
    call = (f"import edgeq; r = edgeq.profile({str(bundle)!r}, prompt_tokens=({DEPTH}, 512), gen=128, repeat={repeat}, "
            f"threads={threads}, machine={machine!r}); r.save_json({str(out)!r}); print(r.table())")
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", call], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"edgeq profile failed:\n{done.stderr}")
    print(done.stdout)
    max_rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return json.loads(out.read_text())["bundles"][0], max_rss_kib * 1024


def machine_profile(path: Path, local: dict, context: int) -> Path:
    """A device profile of this machine, from its bandwidth and GFLOPS measured now (separate processes)."""
    path.write_text(f'''name = "this machine (measured)"
kind = "desktop"
os = "linux"
[memory]
ram_gib = 16.0
budget_gib = 8.0
bandwidth_gbps = {local["bandwidth_gbps"]:.3f}
[compute]
cpu = "this machine"
cores = {local["threads"]}
threads = {local["threads"]}
cpu_gflops = {local["gflops"]:.3f}
[runtime]
formats = ["gguf"]
context_length = {context}
[runtime.precisions]
gguf = ["Q8_0", "Q4_K_M"]
''')
    return path


def verdict(verdicts: harness.Verdicts, name: str, ratio: float, bar: float, detail: str = "") -> None:
    verdicts.check(abs(ratio - 1) <= bar, f"{name:<40} ratio {ratio:.3f}  (bar ±{bar:.0%})  {detail}")


def paired_rounds(binary: Path, bundle: Path, args, machine: dict) -> dict[str, list[float]]:
    """llama-bench, edgeq, llama-bench, edgeq, …, llama-bench: each edgeq run is compared with the mean of the
    llama-bench runs on either side of it, so slow drift of a shared machine cancels out of the ratio."""
    gguf = bundle / edgeq.inspect(bundle)["model_file"]
    benches = [llama_bench(binary, gguf, args.threads, args.repeat)]
    ratios: dict[str, list[float]] = {"decode": [], "prefill": [], "peak memory": []}
    for round_ in range(args.rounds):
        ours, os_max_rss = edgeq_profile_under_time(bundle, args.threads, args.repeat, args.work, machine)
        benches.append(llama_bench(binary, gguf, args.threads, args.repeat))
        anchor = {k: (benches[-2][k] + benches[-1][k]) / 2 for k in benches[-1]}
        rows = {p["prompt_tokens"]: p for p in ours["prompts"]}
        decode, prefill = rows[DEPTH]["decode_tokens_per_s"]["median"], rows[512]["prefill_tokens_per_s"]["median"]
        ratios["decode"].append(decode / anchor["decode"])
        ratios["prefill"].append(prefill / anchor["prefill"])
        ratios["peak memory"].append(ours["peak_rss_bytes"] / os_max_rss)
        print(f"round {round_ + 1}: llama-bench tg128@d{DEPTH} {benches[-2]['decode']:.2f} / {benches[-1]['decode']:.2f}, "
              f"edgeq decode {decode:.2f} tok/s; llama-bench pp512 {benches[-2]['prefill']:.1f} / {benches[-1]['prefill']:.1f}, "
              f"edgeq prefill {prefill:.1f} tok/s; peak RSS edgeq {ours['peak_rss_bytes'] / 1e6:.1f} MB, "
              f"/usr/bin/time {os_max_rss / 1e6:.1f} MB", flush=True)
    return ratios


def main() -> None:
    ap = harness.arguments(__doc__, model="smollm2-plain", text=False, work="edgeq-bench-profile")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="edgeq runs, each between two llama-bench runs")
    ap.add_argument("--precision", default="Q8_0")
    args = harness.parse(ap)
    binary = anchors.tool("llama-bench")
    bundle = harness.exported(args.model, args.work, "gguf", args.precision)
    machine = harness.measure_machine(args.threads)
    device = machine_profile(args.work / "this-machine.toml", machine, 4096)
    ratios = paired_rounds(binary, bundle, args, machine)
    with_estimate = edgeq.profile(bundle, prompt_tokens=(DEPTH, 512), gen=128, repeat=args.repeat, threads=args.threads,
                                  device=device, machine=machine).bundles[0]

    print(f"\n{bundle.name}, {args.threads} threads, {args.repeat} repeats, {args.rounds} rounds, anchor {binary}")
    verdicts = harness.Verdicts()
    verdict(verdicts, f"decode tok/s after {DEPTH} / tg128@d{DEPTH}", statistics.median(ratios["decode"]), BARS["decode"],
            f"rounds {[round(r, 3) for r in ratios['decode']]}")
    verdict(verdicts, "prefill tok/s @512 / pp512", statistics.median(ratios["prefill"]), BARS["prefill"],
            f"rounds {[round(r, 3) for r in ratios['prefill']]}")
    verdict(verdicts, "peak RSS / /usr/bin/time -v max RSS", max(ratios["peak memory"], key=lambda r: abs(r - 1)),
            BARS["peak memory"], f"rounds {[round(r, 4) for r in ratios['peak memory']]}")
    e = with_estimate.estimate
    print(f"  estimate for {e.device}: profile {e.bandwidth_gbps:.2f} GB/s {e.cpu_gflops:.1f} GFLOPS, "
          f"measured now {e.local_bandwidth_gbps:.2f} GB/s {e.local_gflops:.1f} GFLOPS")
    for est in e.prompts:
        measured = with_estimate.prompt(est.prompt_tokens)
        for what, value, truth in (("decode", est.decode_tokens_per_s, measured.decode_tokens_per_s.median),
                                   ("prefill", est.prefill_tokens_per_s, measured.prefill_tokens_per_s.median)):
            verdict(verdicts, f"estimate / measured {what} tok/s @{est.prompt_tokens}", value / truth, BARS["estimate"],
                    f"{value:.2f} vs {truth:.2f}")
    verdicts.exit()


if __name__ == "__main__":
    main()
