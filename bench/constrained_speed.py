"""Decode speed with a JSON schema constraint vs without, same model, same run (issue 17's bar: >= 0.9x).

Both runs go through `model.chat()` greedily for --new-tokens tokens from the same kind of request
(the free one asks for a story, the constrained one for a JSON list of characters long enough to fill
the budget), alternating after a warm-up so drift on a shared CPU hits both alike. Decode tok/s is
edgeq's own measure (every token after the first, per second): for the constrained run it includes
computing the token mask (llguidance), applying it to the logits and advancing the parser.

    python bench/constrained_speed.py [--model smollm2-plain | --bundle BUNDLE] [--threads 2] [--runs 5]
"""
from __future__ import annotations

import json

from lib import harness

import edgeq

SCHEMA = {
    "type": "object",
    "properties": {"characters": {"type": "array", "minItems": 12, "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "role": {"enum": ["hero", "villain", "sidekick", "mentor"]}, "motto": {"type": "string"}},
        "required": ["name", "age", "role", "motto"], "additionalProperties": False}}},
    "required": ["characters"], "additionalProperties": False,
}
FREE = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
CONSTRAINED = [{"role": "user", "content": "List twelve characters of a story about a lighthouse keeper, as JSON."}]


def run(model, messages, new_tokens: int, response_format=None) -> tuple[float, int]:
    model.engine.reset()  # both start from an empty cache: the same prefill work each time
    reply = model.chat(messages, max_new_tokens=new_tokens, temperature=0.0, response_format=response_format)
    if response_format is not None and reply.finish_reason == "stop":
        json.loads(reply.text)
    return model.stats.decode_tokens_per_s, model.stats.generated_tokens


def main() -> None:
    args = harness.parse(harness.arguments(__doc__, model="smollm2-plain", bundle=True, text=False, work="edgeq-bench-speed",
                                           new_tokens=128, runs=5))
    model = edgeq.load(args.bundle, threads=args.threads)
    schema = {"type": "json_schema", "json_schema": {"name": "cast", "schema": SCHEMA}}
    results = harness.alternating({"free text": lambda: run(model, FREE, args.new_tokens),
                                   "JSON schema": lambda: run(model, CONSTRAINED, args.new_tokens, schema)}, args.runs)
    (free_tps, free_n), (schema_tps, schema_n) = harness.medians(results).values()
    print(f"{args.bundle.name}: {model.manifest.get('runtime')}, threads {args.threads}, up to {args.new_tokens} new tokens, "
          f"median of {args.runs} after a warm-up")
    harness.table({"decode tok/s": ">14.2f", "tokens": ">8.0f"}, {"free text": (free_tps, free_n), "JSON schema": (schema_tps, schema_n)})
    verdicts = harness.Verdicts()
    verdicts.check(min(free_n, schema_n) >= args.new_tokens // 2, f"both runs decoded at least half the budget ({free_n:.0f}, {schema_n:.0f})")
    verdicts.at_least("decode tok/s ratio schema/free", schema_tps / free_tps, 0.9)
    model.close()
    verdicts.exit()


if __name__ == "__main__":
    main()
