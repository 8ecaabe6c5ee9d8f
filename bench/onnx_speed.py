"""Decode tokens/s and time to first token: edgeq's INT4 ONNX bundle vs onnxruntime-genai's builder model.

Both come from the same checkpoint (`edgeq export --format onnx --precision int4`: GPTQ on edgeq's
built-in calibration text, so the lm_head is 4-bit as the builder's; `python -m
onnxruntime_genai.models.builder -p int4 -e cpu`), get the same prompt ids (a 512-token slice of
the text, tokenized by edgeq), the same thread count and a KV cache sized for prompt + generated
tokens. edgeq is timed through its engine (prefill, argmax, then one token per step, as generate()
does); the builder's model through onnxruntime-genai's Generator, whose loop runs in C++. One warm-up
each, then `--repeat` alternating rounds; medians are printed with the ratios and bars (issue 3):
decode edgeq/genai >= 1.0, TTFT edgeq/genai <= 1.1.

    python bench/onnx_speed.py [--model HF_FOLDER] [--threads 2]

Measured numbers: see bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import edgeq
from edgeq.default_model import default_model_path
from edgeq.intake import open_model

WIKITEXT = Path("/work/shared/data/wikitext-2/valid.txt")


def prompt_ids(model: Path, text: Path, n: int) -> list[int]:
    ids = open_model(model).chat_tokenizer().encode(text.read_text(encoding="utf-8")[:20 * n])
    if len(ids) < n:
        raise SystemExit(f"{text} gives only {len(ids)} tokens; pass a longer --text")
    return ids[:n]


def edgeq_bundle(model: Path, work: Path) -> Path:
    """edgeq's default INT4: GPTQ on the built-in calibration text, hence a 4-bit lm_head like the builder's."""
    bundle = work / "edgeq-int4-gptq"
    if not (bundle / "edgeq.json").is_file():
        edgeq.export(model, format="onnx", precision="int4", output=bundle, eval_tokens=0, progress=False)
    return bundle


def genai_folder(model: Path, work: Path) -> Path:
    out = work / "genai-int4"
    if not (out / "genai_config.json").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out),
                        "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")], check=True, capture_output=True)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF folder (default: edgeq's default model)")
    parser.add_argument("--text", type=Path, default=WIKITEXT)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeq-bench-onnx-speed"))
    args = parser.parse_args()
    model = args.model or default_model_path(progress=False)
    args.work.mkdir(parents=True, exist_ok=True)
    prompt = prompt_ids(model, args.text, args.prompt_tokens)
    n_ctx = args.prompt_tokens + args.gen
    runners = [EdgeqRunner(edgeq_bundle(model, args.work), args.threads, n_ctx), GenaiRunner(genai_folder(model, args.work), args.threads, n_ctx)]
    results = {r.name: [] for r in runners}
    for round_ in range(args.repeat + 1):
        for runner in runners if round_ % 2 else runners[::-1]:
            ttft, decode = runner.run(prompt, args.gen)
            if round_:  # round 0 warms up
                results[runner.name].append((ttft, decode))
    print(f"model {model.name}, prompt {args.prompt_tokens} tokens, {args.gen} generated, threads {args.threads}, median of {args.repeat}")
    medians = {}
    for name, rows in results.items():
        ttft, decode = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
        medians[name] = (ttft, decode)
        print(f"{name:6s} TTFT {ttft * 1000:8.1f} ms   decode {decode:7.1f} tok/s   (TTFT runs: {', '.join(f'{r[0] * 1000:.0f}' for r in rows)})")
    decode_ratio = medians["edgeq"][1] / medians["genai"][1]
    ttft_ratio = medians["edgeq"][0] / medians["genai"][0]
    print(f"[{'PASS' if decode_ratio >= 1.0 else 'FAIL'}] decode tok/s edgeq/genai = {decode_ratio:.3f} (bar >= 1.0)")
    print(f"[{'PASS' if ttft_ratio <= 1.1 else 'FAIL'}] TTFT edgeq/genai = {ttft_ratio:.3f} (bar <= 1.1)")


if __name__ == "__main__":
    main()
