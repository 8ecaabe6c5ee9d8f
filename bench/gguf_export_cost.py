"""Cost of exporting a 1.5B-shaped model to Q4_K_M: edgeq vs llama.cpp's convert script + llama-quantize.

The model (`shape-llama`, made once by lib/real_models.py) has Qwen2.5-1.5B's exact tensor shapes and
random weights: cost does not depend on the weights' values. `--model shape-qwen2` (with q/k/v biases)
is what the other 1.5B benches use; llama.cpp's convert script refuses it here, because under a qwen2
config transformers loads the borrowed SmolLM2 tokenizer as Qwen2Tokenizer, whose pre-tokenizer hash
the script does not know; `shape-llama` has the same shapes without the biases and converts on both sides.

Each step runs as its own process under /usr/bin/time -v (exact peak RSS from wait4); the
source files are read once beforehand so both tools start with a warm page cache. llama.cpp's
cost is convert (f16) + quantize: wall times add up, the peak is the larger one. Bars (issue 2):
edgeq peak RSS <= llama.cpp's; edgeq wall time <= 1.2x llama.cpp's.

    LLAMA_CPP_BIN=... LLAMA_CPP_SRC=... python bench/gguf_export_cost.py [--runs 1]
"""
from __future__ import annotations

import shutil
from pathlib import Path

from lib import anchors
from lib import harness


def llamacpp_cost(model: Path, work: Path) -> harness.Run:
    f16, q4 = work / "llamacpp-f16.gguf", work / "llamacpp-Q4_K_M.gguf"
    argv, env = anchors.convert_command(model, f16, "f16")
    convert = harness.timed_process(argv, env, work / "convert.log")
    quantize = harness.timed_process(anchors.quantize_command(f16, q4, "Q4_K_M"), log=work / "quantize.log")
    print(f"  llama.cpp convert  {convert.wall_s:8.1f} s {convert.peak_rss_mib:9.0f} MiB")
    print(f"  llama.cpp quantize {quantize.wall_s:8.1f} s {quantize.peak_rss_mib:9.0f} MiB ({q4.stat().st_size / 2**20:.0f} MiB file)")
    f16.unlink()
    q4.unlink()
    return harness.Run(convert.wall_s + quantize.wall_s, max(convert.peak_rss_mib, quantize.peak_rss_mib))


def edgeq_cost(model: Path, work: Path) -> harness.Run:
    bundle = work / "edgeq-Q4_K_M"
    shutil.rmtree(bundle, ignore_errors=True)
    run = harness.timed_process(harness.export_command(model, bundle, format="gguf", precision="Q4_K_M"), log=work / "edgeq.log")
    print(f"  edgeq export       {run.wall_s:8.1f} s {run.peak_rss_mib:9.0f} MiB ({(bundle / 'model.gguf').stat().st_size / 2**20:.0f} MiB file)")
    shutil.rmtree(bundle)
    return run


def main() -> None:
    ap = harness.arguments(__doc__, model="shape-llama", text=False, threads=None, work="edgeq-bench-export")
    ap.add_argument("--runs", type=int, default=1, help="alternating runs of each; the best wall time and peak count")
    args = harness.parse(ap)
    harness.warm(args.model)

    ours, theirs = [], []
    for i in range(args.runs):
        print(f"run {i + 1}: {args.model.name} -> Q4_K_M")
        theirs.append(llamacpp_cost(args.model, args.work))
        ours.append(edgeq_cost(args.model, args.work))
    wall, rss = min(r.wall_s for r in ours), min(r.peak_rss_mib for r in ours)
    t_wall, t_rss = min(r.wall_s for r in theirs), min(r.peak_rss_mib for r in theirs)
    harness.table({"wall s": ">9.1f", "peak RSS MiB": ">14.0f"}, {"edgeq": (wall, rss), "llama.cpp": (t_wall, t_rss)})
    verdicts = harness.Verdicts()
    verdicts.at_most("peak RSS ratio edgeq/llama.cpp", rss / t_rss, 1.0)
    verdicts.at_most("wall time ratio edgeq/llama.cpp", wall / t_wall, 1.2)
    verdicts.exit()


if __name__ == "__main__":
    main()
