"""Time to first token of a chat's sixth turn vs its first (issue 17's bar: <= 1.3x): the KV cache is reused.

A six-turn greedy chat through `model.chat()`, each user message the same length; each turn's prompt is
the whole history, but the engine's cache still holds the previous turns, so only the new message (and
the tail of the last reply where it re-tokenizes differently) is prefilled. The same chat is repeated
--runs times after a warm-up; medians per turn. The row "turn 6, fresh" is the same sixth prompt from an
empty cache: what every turn would cost without reuse.

    python bench/chat_ttft.py [--model smollm2-plain | --bundle BUNDLE] [--threads 2] [--runs 3]
"""
from __future__ import annotations

import statistics

import harness

import edgeq

MESSAGES = ["Tell me one fact about the moon.", "Tell me one fact about the sea.", "Tell me one fact about a forest.",
            "Tell me one fact about the wind.", "Tell me one fact about a river.", "Tell me one fact about the sun."]


def chat(model, new_tokens: int) -> list[tuple[float, int]]:
    """(time to first token s, prefilled tokens) of each turn, from an empty cache."""
    model.engine.reset()
    history, turns = [], []
    for text in MESSAGES:
        history.append({"role": "user", "content": text})
        reply = model.chat(history, max_new_tokens=new_tokens, temperature=0.0)
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
    chat(model, args.new_tokens)  # warm-up
    runs = [chat(model, args.new_tokens) for _ in range(args.runs)]
    medians = [(statistics.median(r[i][0] for r in runs), statistics.median(r[i][1] for r in runs)) for i in range(len(MESSAGES) + 1)]
    print(f"{args.bundle.name}: {model.manifest.get('runtime')}, threads {args.threads}, replies up to {args.new_tokens} tokens, "
          f"median of {args.runs} chats after a warm-up")
    labels = [f"turn {i + 1}" for i in range(len(MESSAGES))] + ["turn 6, fresh"]
    harness.table({"TTFT ms": ">10.2f", "prefilled": ">11.0f"}, {label: (t * 1e3, n) for label, (t, n) in zip(labels, medians)}, 14)
    verdicts = harness.Verdicts()
    (t1, n1), (t6, n6), (fresh, whole) = medians[0], medians[5], medians[6]
    verdicts.info(f"turn 1 prefilled {n1:.0f} tokens, turn 6 {n6:.0f} of its {whole:.0f}")
    verdicts.at_most("TTFT ratio turn 6 / turn 1", t6 / t1, 1.3)
    verdicts.at_most("TTFT ratio turn 6 / turn 6 from an empty cache", t6 / fresh, 0.9)
    model.close()
    verdicts.exit()


if __name__ == "__main__":
    main()
