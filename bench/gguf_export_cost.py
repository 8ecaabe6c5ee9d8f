"""Cost of exporting a 1.5B-shaped model to Q4_K_M: edgeq vs llama.cpp's convert script + llama-quantize.

The model has Qwen2.5-1.5B's exact tensor shapes (hidden 1536, 28 layers, 12 heads / 2 KV heads,
intermediate 8960, vocab 151936, tied embeddings, bf16 safetensors) and random weights: no 1.5B
checkpoint or Qwen tokenizer is available offline, so it borrows SmolLM2's byte-level BPE tokenizer
(49152 tokens), which both tools pad to 151936 rows. Cost does not depend on the weights' values.
It is made once and reused. `--arch qwen2` (with q/k/v biases) is what the other 1.5B benches use;
llama.cpp's convert script refuses it here, because under a qwen2 config transformers loads the
borrowed tokenizer as Qwen2Tokenizer, whose pre-tokenizer hash the script does not know; the
default `--arch llama` has the same shapes without the biases and converts on both sides.

Each step runs as its own process under /usr/bin/time -v (exact peak RSS from wait4); the
source files are read once beforehand so both tools start with a warm page cache. llama.cpp's
cost is convert (f16) + quantize: wall times add up, the peak is the larger one. Bars (issue 2):
edgeq peak RSS <= llama.cpp's; edgeq wall time <= 1.2x llama.cpp's.

    LLAMA_CPP_BIN=... LLAMA_CPP_SRC=... python bench/gguf_export_cost.py [--runs 1]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import anchors

MODELS = Path("~/.cache/edgeq/models").expanduser()
SHAPE = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
             intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
             rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EDGEQ_EXPORT = ("import sys, edgeq; edgeq.export(sys.argv[1], format='gguf', precision='Q4_K_M', output=sys.argv[2], "
                "eval_tokens=0, progress=False)")


def make_model(folder: Path, arch: str = "qwen2") -> None:
    """Random Qwen2.5-1.5B-shaped checkpoint in bf16 (run in its own process to keep the parent small)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from edgeq.default_model import default_model_path

    torch.manual_seed(0)
    config = Qwen2Config(**SHAPE) if arch == "qwen2" else LlamaConfig(**SHAPE, head_dim=SHAPE["hidden_size"] // SHAPE["num_attention_heads"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer = default_model_path(progress=False)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer / name, partial / name)
    partial.rename(folder)


def warm(folder: Path) -> None:
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def llamacpp_cost(model: Path, work: Path) -> tuple[float, float]:
    f16, q4 = work / "llamacpp-f16.gguf", work / "llamacpp-Q4_K_M.gguf"
    argv, env = anchors.convert_command(model, f16, "f16")
    convert = anchors.run(argv, env, work / "convert.log")
    quantize = anchors.run(anchors.quantize_command(f16, q4, "Q4_K_M"), log=work / "quantize.log")
    print(f"  llama.cpp convert  {convert.wall_s:8.1f} s {convert.peak_rss_mib:9.0f} MiB")
    print(f"  llama.cpp quantize {quantize.wall_s:8.1f} s {quantize.peak_rss_mib:9.0f} MiB ({q4.stat().st_size / 2**20:.0f} MiB file)")
    f16.unlink()
    q4.unlink()
    return convert.wall_s + quantize.wall_s, max(convert.peak_rss_mib, quantize.peak_rss_mib)


def edgeq_cost(model: Path, work: Path) -> tuple[float, float]:
    bundle = work / "edgeq-Q4_K_M"
    shutil.rmtree(bundle, ignore_errors=True)
    run = anchors.run([sys.executable, "-c", EDGEQ_EXPORT, str(model), str(bundle)], log=work / "edgeq.log")
    size = (bundle / "model.gguf").stat().st_size / 2**20
    print(f"  edgeq export       {run.wall_s:8.1f} s {run.peak_rss_mib:9.0f} MiB ({size:.0f} MiB file)")
    shutil.rmtree(bundle)
    return run.wall_s, run.peak_rss_mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=("llama", "qwen2"), default="llama", help="architecture of the 1.5B-shaped model")
    ap.add_argument("--model", type=Path, help="made on first use if missing (default: bench-ARCH-1.5b-shape in ~/.cache/edgeq/models)")
    ap.add_argument("--runs", type=int, default=1, help="alternating runs of each; the best wall time and peak count")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeq-bench-export"))
    ap.add_argument("--make-model", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or MODELS / f"bench-{args.arch}-1.5b-shape"
    if args.make_model:
        return make_model(args.model, args.arch)
    if not (args.model / "config.json").is_file():
        print(f"making the 1.5B-shaped model at {args.model} (once)")
        subprocess.run([sys.executable, __file__, "--make-model", "--arch", args.arch, "--model", str(args.model)], check=True)
    args.work.mkdir(parents=True, exist_ok=True)
    warm(args.model)

    ours, theirs = [], []
    for i in range(args.runs):
        print(f"run {i + 1}: {args.model.name} -> Q4_K_M")
        theirs.append(llamacpp_cost(args.model, args.work))
        ours.append(edgeq_cost(args.model, args.work))
    wall, rss = min(w for w, _ in ours), min(r for _, r in ours)
    t_wall, t_rss = min(w for w, _ in theirs), min(r for _, r in theirs)
    print(f"{'':<12}{'wall s':>9}{'peak RSS MiB':>14}")
    print(f"{'edgeq':<12}{wall:>9.1f}{rss:>14.0f}")
    print(f"{'llama.cpp':<12}{t_wall:>9.1f}{t_rss:>14.0f}")
    print(f"[{'PASS' if rss <= t_rss else 'FAIL'}] peak RSS ratio edgeq/llama.cpp = {rss / t_rss:.3f} (bar <= 1.0)")
    print(f"[{'PASS' if wall <= 1.2 * t_wall else 'FAIL'}] wall time ratio edgeq/llama.cpp = {wall / t_wall:.3f} (bar <= 1.2)")


if __name__ == "__main__":
    main()
