"""`edgeq.load(bundle).generate()` vs a bare llama-cpp-python loop on the same GGUF file and threads.

The bare loop is the least a Python program can do with llama.cpp: llama_decode of the prompt
ids, then greedy argmax over llama_get_logits_ith and llama_decode of one token, repeated. Both
get the same prompt ids (edgeq's tokenization), the same n_ctx and threads; runs alternate
(edgeq, bare, edgeq, ...) after one warm-up each so drift on a shared CPU hits both alike.
Time to first token includes clearing the KV cache and the prompt decode in both. Bars (issue 2):
decode tok/s ratio edgeq/bare >= 0.97, TTFT ratio <= 1.05.

    python bench/gguf_generate_speed.py [--bundle BUNDLE] [--threads 2] [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import llama_cpp
import numpy as np

import edgeq

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
          "from Mainz, combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
          "Within fifty years")


class BareLoop:
    """llama-cpp-python's low-level API and nothing else."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def _argmax(self) -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).argmax())

    def run(self, prompt_ids: list[int], n_new: int) -> tuple[float, float, list[int]]:
        """(time to first token s, decode tokens/s, generated ids)."""
        prompt = (llama_cpp.llama_token * len(prompt_ids))(*prompt_ids)
        one = (llama_cpp.llama_token * 1)()
        start = time.perf_counter()
        llama_cpp.llama_memory_clear(self.memory, True)
        assert llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(prompt, len(prompt_ids))) == 0
        out = [self._argmax()]
        first = time.perf_counter()
        for _ in range(n_new - 1):
            one[0] = out[-1]
            assert llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
            out.append(self._argmax())
        end = time.perf_counter()
        return first - start, (n_new - 1) / (end - first), out

    def close(self) -> None:
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


def edgeq_run(model, prompt: str, n_new: int) -> tuple[float, float, int]:
    model.generate(prompt, max_new_tokens=n_new, temperature=0.0)
    s = model.stats
    return s.time_to_first_token_s, s.decode_tokens_per_s, s.generated_tokens


def default_bundle(work: Path) -> Path:
    bundle = work / "smollm2-135m-q4_k_m"
    if not (bundle / "edgeq.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        edgeq.export(None, format="gguf", precision="Q4_K_M", output=bundle, eval_tokens=0, progress=False)
    return bundle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="an edgeq GGUF bundle (default: SmolLM2-135M-Instruct at Q4_K_M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeq-bench-speed"))
    args = ap.parse_args()
    bundle = args.bundle or default_bundle(args.work)

    model = edgeq.load(bundle, threads=args.threads)
    prompt_ids = model.tokenizer.prompt_ids(PROMPT)
    bare = BareLoop(bundle / model.manifest["model_file"], args.threads, model.engine.n_ctx)
    ours_ids = model.generate_ids(prompt_ids, args.new_tokens)
    _, _, bare_ids = bare.run(prompt_ids, len(ours_ids))
    same = "same" if ours_ids == bare_ids[:len(ours_ids)] else "DIFFERENT"
    print(f"{bundle.name}: {Path(model.manifest['model_file']).name}, {len(prompt_ids)} prompt tokens, "
          f"{len(ours_ids)} new tokens ({same} greedy ids), threads {args.threads}, n_ctx {model.engine.n_ctx}, "
          f"median of {args.runs} after a warm-up")

    ours, theirs = [], []
    for i in range(args.runs + 1):
        ttft, tps, n = edgeq_run(model, PROMPT, args.new_tokens)
        b_ttft, b_tps, _ = bare.run(prompt_ids, n)
        if i:  # run 0 is the warm-up
            ours.append((ttft, tps))
            theirs.append((b_ttft, b_tps))
    ttft, tps = (statistics.median(x) for x in zip(*ours))
    b_ttft, b_tps = (statistics.median(x) for x in zip(*theirs))
    print(f"{'':<12}{'TTFT ms':>10}{'decode tok/s':>14}")
    print(f"{'edgeq':<12}{ttft * 1e3:>10.2f}{tps:>14.2f}")
    print(f"{'bare loop':<12}{b_ttft * 1e3:>10.2f}{b_tps:>14.2f}")
    decode_ratio, ttft_ratio = tps / b_tps, ttft / b_ttft
    print(f"[{'PASS' if decode_ratio >= 0.97 else 'FAIL'}] decode tok/s ratio edgeq/bare = {decode_ratio:.3f} (bar >= 0.97)")
    print(f"[{'PASS' if ttft_ratio <= 1.05 else 'FAIL'}] TTFT ratio edgeq/bare = {ttft_ratio:.3f} (bar <= 1.05)")
    bare.close()
    model.close()


if __name__ == "__main__":
    main()
