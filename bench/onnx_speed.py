"""Decode tokens/s and time to first token: edgeq's INT4 ONNX bundle vs onnxruntime-genai's builder model.

Both come from the same checkpoint (`edgeq export --format onnx --precision int4`: GPTQ on edgeq's
built-in calibration text, so the lm_head is 4-bit as the builder's; `python -m
onnxruntime_genai.models.builder -p int4 -e cpu`), get the same prompt ids (a 512-token slice of
the text, tokenized by edgeq), the same thread count and a KV cache sized for prompt + generated
tokens. edgeq is timed through its engine (prefill, argmax, then one token per step, as generate()
does); the builder's model through onnxruntime-genai's Generator, whose loop runs in C++. One warm-up
each, then `--repeat` alternating rounds; medians are printed with the ratios and bars (issue 3):
decode edgeq/genai >= 1.0, TTFT edgeq/genai <= 1.1.

    python bench/onnx_speed.py [--model qwen-coder | HF_FOLDER] [--threads 2]

Measured numbers: see bench/README.md.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from lib import anchors
from lib import harness
import numpy as np

import edgeq


def prompt_ids(model: Path, text: Path, n: int) -> list[int]:
    ids = harness.open_model(model).chat_tokenizer().encode(text.read_text(encoding="utf-8")[:20 * n])
    if len(ids) < n:
        raise SystemExit(f"{text} gives only {len(ids)} tokens; pass a longer --text")
    return ids[:n]


def genai_folder(model: Path, work: Path) -> Path:
    out = work / f"{model.name}-genai-int4"
    if not (out / "genai_config.json").is_file():
        subprocess.run(anchors.genai_builder_command(model, out, work / "genai-cache"), check=True, capture_output=True)
    return out


class EdgeqRunner:
    name = "edgeq"

    def __init__(self, bundle: Path, threads: int, n_ctx: int):
        self.engine = edgeq.load(bundle, threads=threads, n_ctx=n_ctx).engine

    def run(self, prompt: list[int], gen: int) -> tuple[float, float]:
        engine = self.engine
        start = time.perf_counter()
        engine.reset()
        token = int(np.argmax(engine.forward(prompt)))
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(gen - 1):
            token = int(np.argmax(engine.forward([token])))
        return ttft, (gen - 1) / (time.perf_counter() - start)


class GenaiRunner:
    name = "genai"

    def __init__(self, folder: Path, threads: int, n_ctx: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.n_ctx = n_ctx

    def run(self, prompt: list[int], gen: int) -> tuple[float, float]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.n_ctx, do_sample=False)
        generator = self.og.Generator(self.model, params)  # allocates the KV buffers, as edgeq does at load
        start = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        generator.get_next_tokens()
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(gen - 1):
            if generator.is_done():
                raise SystemExit(f"genai stopped after {step + 1} tokens (end of sequence); use another --text")
            generator.generate_next_token()
            generator.get_next_tokens()
        return ttft, (gen - 1) / (time.perf_counter() - start)


def main() -> None:
    ap = harness.arguments(__doc__, model="smollm2-plain", work="edgeq-bench-onnx-speed")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = harness.parse(ap)
    prompt = prompt_ids(args.model, args.text, args.prompt_tokens)
    n_ctx = args.prompt_tokens + args.gen
    # edgeq's default INT4: GPTQ on the built-in calibration text, hence a 4-bit lm_head like the builder's
    runners = [EdgeqRunner(harness.exported(args.model, args.work, "onnx", "int4"), args.threads, n_ctx),
               GenaiRunner(genai_folder(args.model, args.work), args.threads, n_ctx)]
    results = harness.alternating({r.name: lambda r=r: r.run(prompt, args.gen) for r in runners}, args.repeat)
    print(f"model {args.model.name}, prompt {args.prompt_tokens} tokens, {args.gen} generated, threads {args.threads}, median of {args.repeat}")
    medians = harness.medians(results)
    for name, (ttft, decode) in medians.items():
        print(f"{name:6s} TTFT {ttft * 1000:8.1f} ms   decode {decode:7.1f} tok/s   "
              f"(TTFT runs: {', '.join(f'{r[0] * 1000:.0f}' for r in results[name])})")
    verdicts = harness.Verdicts()
    verdicts.at_least("decode tok/s edgeq/genai", medians["edgeq"][1] / medians["genai"][1], 1.0)
    verdicts.at_most("TTFT edgeq/genai", medians["edgeq"][0] / medians["genai"][0], 1.1)
    verdicts.exit()


if __name__ == "__main__":
    main()
