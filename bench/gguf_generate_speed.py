"""`edgeq.load(bundle).generate()` vs a bare llama-cpp-python loop on the same GGUF file and threads.

The bare loop is the least a Python program can do with llama.cpp: llama_decode of the prompt
ids, then greedy argmax over llama_get_logits_ith and llama_decode of one token, repeated. Both
get the same prompt ids (edgeq's tokenization), the same n_ctx and threads; runs alternate
(edgeq, bare, bare, edgeq, ...) after one warm-up each so drift on a shared CPU hits both alike.
Time to first token includes clearing the KV cache and the prompt decode in both. Bars (issue 2):
decode tok/s ratio edgeq/bare >= 0.97, TTFT ratio <= 1.05.

    python bench/gguf_generate_speed.py [--model qwen-coder | --bundle BUNDLE] [--threads 2] [--runs 5]
"""
from __future__ import annotations

import time
from pathlib import Path

from lib import harness
import llama_cpp
import numpy as np

import edgeq
from edgeq.runtimes.llamacpp_amx import extra_buffers_usable

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
          "from Mainz, combined movable metal type, oil-based ink and a wooden press adapted from wine making. "
          "Within fifty years")


class BareLoop:
    """llama-cpp-python's low-level API and nothing else."""

    def __init__(self, path: Path, threads: int, n_ctx: int):
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = extra_buffers_usable(path)  # as edgeq's engine does: off only where AMX faults
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
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


def edgeq_run(model, prompt: str, n_new: int) -> tuple[float, float]:
    model.generate(prompt, max_new_tokens=n_new, temperature=0.0)
    return model.stats.time_to_first_token_s, model.stats.decode_tokens_per_s


def main() -> None:
    args = harness.parse(harness.arguments(__doc__, model="smollm2-plain", bundle=True, text=False, work="edgeq-bench-speed",
                                           new_tokens=128, runs=5))

    model = edgeq.load(args.bundle, threads=args.threads)
    prompt_ids = model.tokenizer.prompt_ids(PROMPT)
    bare = BareLoop(args.bundle / model.manifest["model_file"], args.threads, model.engine.n_ctx)
    ours_ids = model.generate_ids(prompt_ids, args.new_tokens)
    _, _, bare_ids = bare.run(prompt_ids, len(ours_ids))
    same = "same" if ours_ids == bare_ids[:len(ours_ids)] else "DIFFERENT"
    print(f"{args.bundle.name}: {Path(model.manifest['model_file']).name}, {len(prompt_ids)} prompt tokens, "
          f"{len(ours_ids)} new tokens ({same} greedy ids), threads {args.threads}, n_ctx {model.engine.n_ctx}, "
          f"median of {args.runs} after a warm-up")

    results = harness.alternating({"edgeq": lambda: edgeq_run(model, PROMPT, args.new_tokens),
                                   "bare loop": lambda: bare.run(prompt_ids, len(ours_ids))[:2]}, args.runs)
    (ttft, tps), (b_ttft, b_tps) = harness.medians(results).values()
    harness.table({"TTFT ms": ">10.2f", "decode tok/s": ">14.2f"}, {"edgeq": (ttft * 1e3, tps), "bare loop": (b_ttft * 1e3, b_tps)})
    verdicts = harness.Verdicts()
    verdicts.at_least("decode tok/s ratio edgeq/bare", tps / b_tps, 0.97)
    verdicts.at_most("TTFT ratio edgeq/bare", ttft / b_ttft, 1.05)
    bare.close()
    model.close()
    verdicts.exit()


if __name__ == "__main__":
    main()
