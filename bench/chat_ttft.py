"""Time to first token of a chat's sixth turn vs its first (issue 17's bar: <= 1.3x): the KV cache is reused.

A six-turn chat through `model.chat()`, each user message the same length; each turn's prompt is the whole
history, but the engine's cache still holds the previous turns. Sampled (no seed), only the new message (and the
tail of the last reply where it re-tokenizes differently) is prefilled. Greedy, the cache is reused only up to the
last fixed 64-token prefill boundary of the earlier prompts, so the reply is the one a fresh process gives (issue 32):
the last reply and the rest of its chunk are prefilled again, and the greedy/sampled ratio is what that costs. The
same chats are repeated --runs times after a warm-up; medians per turn. The row "turn 6, fresh" is the same sixth
prompt from an empty cache: what every turn would cost without reuse.

    python bench/chat_ttft.py [--model smollm2-plain | --bundle BUNDLE] [--threads 2] [--runs 3]
"""
from __future__ import annotations

import statistics

from lib import harness

import edgeq

MESSAGES = ["Tell me one fact about the moon.", "Tell me one fact about the sea.", "Tell me one fact about a forest.",
            "Tell me one fact about the wind.", "Tell me one fact about a river.", "Tell me one fact about the sun."]


def chat(model, new_tokens: int, temperature: float) -> list[tuple[float, int]]:
    """(time to first token s, prefilled tokens) of each turn, from an empty cache."""
    model.engine.reset()
    history, turns = [], []
    for text in MESSAGES:
        history.append({"role": "user", "content": text})
        reply = model.chat(history, max_new_tokens=new_tokens, temperature=temperature)
        turns.append((model.stats.time_to_first_token_s, model.stats.prompt_tokens - model.stats.cached_tokens))
        history.append(reply.message())
    model.engine.reset()
    model.chat(history[:-1], max_new_tokens=1, temperature=0.0)
    turns.append((model.stats.time_to_first_token_s, model.stats.prompt_tokens))
    return turns


def main() -> None:
    args = harness.parse(harness.arguments(__doc__, model="smollm2-plain", bundle=True, text=False, work="edgeq-bench-speed",
                                           new_tokens=48, runs=3))
    model = edgeq.load(args.bundle, threads=args.threads)
    print(f"{args.bundle.name}: {model.manifest.get('runtime')}, threads {args.threads}, replies up to {args.new_tokens} tokens, "
          f"median of {args.runs} chats after a warm-up")
    verdicts = harness.Verdicts()
    sixth = {}
    for label, temperature in (("sampled", 0.8), ("greedy", 0.0)):
        chat(model, args.new_tokens, temperature)  # warm-up
        runs = [chat(model, args.new_tokens, temperature) for _ in range(args.runs)]
        medians = [(statistics.median(r[i][0] for r in runs), statistics.median(r[i][1] for r in runs)) for i in range(len(MESSAGES) + 1)]
        print(f"\n{label}:")
        labels = [f"turn {i + 1}" for i in range(len(MESSAGES))] + ["turn 6, fresh"]
        harness.table({"TTFT ms": ">10.2f", "prefilled": ">11.0f"}, {row: (t * 1e3, n) for row, (t, n) in zip(labels, medians)}, 14)
        (t1, n1), (t6, n6), (fresh, whole) = medians[0], medians[5], medians[6]
        sixth[label] = t6
        verdicts.info(f"{label}: turn 1 prefilled {n1:.0f} tokens, turn 6 {n6:.0f} of its {whole:.0f}")
        if label == "sampled":
            verdicts.at_most("sampled: TTFT ratio turn 6 / turn 1", t6 / t1, 1.3)
        verdicts.at_most(f"{label}: TTFT ratio turn 6 / turn 6 from an empty cache", t6 / fresh, 0.9)
    verdicts.info(f"greedy / sampled TTFT of turn 6 (the cost of replies independent of the cache's history): "
                  f"{sixth['greedy'] / sixth['sampled']:.2f}")
    model.close()
    verdicts.exit()


if __name__ == "__main__":
    main()
