"""Speculative decoding against plain decoding, end to end, in the same run: whole replies' tokens/s (prefill included),
acceptance, identical greedy text; and the break-even point of this machine.

  lookup on editing/extraction prompts   --model's Q4_K_M GGUF with prompt lookup        bars: >= 4 accepted tokens per pass
                                         drafting as deep as the exact width allows; end to end >= 0.95x plain
  lookup on free chat and on code        the same                                          bar: end to end >= 0.95x plain
  a draft/target pair, one tokenizer     --model at Q4_0 drafting for its own Q8_0, GGUF   bar: identical text, >= 0.95x plain
                                         and ONNX (int4 drafting for int8: onnxruntime's 1-row runs compute other bits
                                         than its batches, so a model loaded with a draft takes greedy steps as 2-row
                                         batches; greedy text identical adaptive and drafting as deep as allowed)
  break-even                             a verification pass of w tokens in single decode steps, measured; the acceptance
                                         rate at which k drafted tokens pay, here and on a bandwidth-bound device

Greedy unless said. Replies alternate plain / speculative (harness.alternating), medians over --runs.

    python bench/speculative.py [--model qwen-coder-plain] [--threads 2] [--runs 2] [--only lookup,gguf-pair,onnx-pair]
"""
from __future__ import annotations

import time

from lib import harness
import numpy as np

import edgeq
from edgeq.speculation import probe_exact_width

EDIT_SOURCE = '''def moving_average(values, window):
    """Average of each run of `window` consecutive values."""
    out = []
    for i in range(len(values) - window + 1):
        total = 0
        for j in range(window):
            total = total + values[i + j]
        out.append(total / window)
    return out


def normalise(values):
    low, high = min(values), max(values)
    return [(v - low) / (high - low) for v in values]
'''
CONFIG_SOURCE = """server:
  host: 0.0.0.0
  port: 8080
  workers: 4
  timeout_seconds: 30
database:
  url: postgres://app@db.internal:5432/orders
  pool_size: 10
  retry: 3
logging:
  level: info
  file: /var/log/orders/app.log
"""
LOG_SOURCE = """2026-03-02 10:14:07 INFO  worker-1 started job 4411 (import orders.csv)
2026-03-02 10:14:09 WARN  worker-2 slow query on table customers (2.4 s)
2026-03-02 10:14:11 ERROR worker-1 job 4411 failed: column 'price' has a non-numeric value in row 812
2026-03-02 10:14:12 INFO  worker-3 started job 4412 (export invoices)
2026-03-02 10:14:15 ERROR worker-3 job 4412 failed: disk quota exceeded on /var/exports
2026-03-02 10:14:16 INFO  worker-2 finished job 4410 in 31.2 s
"""
EDIT = [  # the reply copies most of its input: edits and extraction, on code, config, logs, prose and contacts
    f"Rename the variable `total` to `running_sum` in this code and return the whole code:\n\n{EDIT_SOURCE}",
    f"Add type hints to every function in this code and return the whole code:\n\n{EDIT_SOURCE}",
    f"Change the port to 9090 and the pool size to 20 in this YAML config and return the whole file:\n\n{CONFIG_SOURCE}",
    f"Copy out every ERROR line of this log, unchanged, one per line:\n\n{LOG_SOURCE}",
    "Extract every name and email address from this text as a list of `name <email>` lines:\n\n"
    "Our team: Alice Martin (alice.martin@example.com) leads design; Bob Chen, bob.chen@example.org, writes the backend; "
    "Carla Diaz <carla@example.net> tests releases; and Dan Okafor (dan.okafor@example.com) handles support.",
    "Fix the spelling mistakes in this paragraph and return the corrected paragraph:\n\nThe comittee recieved the "
    "proposel on Wendesday and agred to discus it at there next meating, wich will be held in the libary.",
]
CHAT = ["Tell me a short story about a lighthouse keeper.", "What should I pack for a week of hiking in the Alps?",
        "Explain why the sky is blue to a ten-year-old."]
CODE = ["Write a Python function that checks whether a string is a palindrome.",
        "Write a Python class for a stack with push, pop and peek.",
        "Write a function that merges two sorted lists into one sorted list."]


def replies(model, prompts, n_new: int, **options) -> tuple:
    """(tokens/s of the whole replies, accepted per pass, acceptance, texts) for one pass over the prompts."""
    tokens = accepted = rejected = passes = 0
    texts = []
    start = time.perf_counter()
    for prompt in prompts:
        model.engine.reset()
        reply = model.chat([{"role": "user", "content": prompt}], max_new_tokens=n_new, **options)
        texts.append(reply.text)
        u = reply.usage
        tokens, accepted, rejected, passes = tokens + u.completion_tokens, accepted + u.accepted_prediction_tokens, \
            rejected + u.rejected_prediction_tokens, passes + u.speculative_passes
    seconds = time.perf_counter() - start
    return tokens / seconds, accepted / max(passes, 1), accepted / max(accepted + rejected, 1), texts


def compare(label: str, model, prompts, args, verdicts, speed_bar: float | None = 0.95, accept_bar: float | None = None,
            deep: bool = False, **options) -> None:
    rows = harness.alternating({"plain": lambda: replies(model, prompts, args.new_tokens, speculative=False, **options),
                                "speculative": lambda: replies(model, prompts, args.new_tokens, **options)}, args.runs)
    plain, spec = rows["plain"], rows["speculative"]
    plain_tps, spec_tps = np.median([r[0] for r in plain]), np.median([r[0] for r in spec])
    per_pass, rate = np.median([r[1] for r in spec]), np.median([r[2] for r in spec])
    print(f"{label:<44} plain {plain_tps:7.2f} tok/s  speculative {spec_tps:7.2f} tok/s  ratio {spec_tps / plain_tps:.3f}  "
          f"accepted/pass {per_pass:.2f}  acceptance {rate:.2f}", flush=True)
    if options.get("temperature", 0) == 0:
        verdicts.check(all(p[3] == s[3] for p, s in zip(plain, spec)), f"{label}: greedy text identical")
    if speed_bar is not None:
        verdicts.at_least(f"{label}: end-to-end speculative/plain", spec_tps / plain_tps, speed_bar)
    if accept_bar is not None or deep:  # the drafter's own acceptance: drafting as deep as the exact width allows, as a
        model.speculation.fixed_depth = True  # bandwidth-bound device's policy does (a pass there costs about a step)
        full = replies(model, prompts, args.new_tokens, **options)
        model.speculation.fixed_depth = False
        print(f"{label:<44} drafting as deep as allowed: accepted/pass {full[1]:.2f}  acceptance {full[2]:.2f}  "
              f"(adaptive depth here: {per_pass:.2f})", flush=True)
        verdicts.check(full[3] == plain[0][3], f"{label}: greedy text identical at full depth")
        if accept_bar is not None:
            verdicts.at_least(f"{label}: accepted tokens per pass at full depth", full[1], accept_bar, ".2f")


def pass_costs(model, widths=range(1, 10), repeats: int = 5) -> dict[int, float]:
    """Seconds of a verification pass of w tokens ÷ seconds of one single decode step, after a 128-token context."""
    engine = model.engine
    ids = np.random.default_rng(0).integers(0, engine.n_vocab, 128 + max(widths)).tolist()
    engine.reset()
    engine.forward(ids[:128])
    times = {w: [] for w in widths}
    for _ in range(repeats):
        for w in widths:
            engine.truncate(128)
            start = time.perf_counter()
            engine.forward(ids[128:129]) if w == 1 else engine.forward_all(ids[128:128 + w])
            times[w].append(time.perf_counter() - start)
    one = np.median(times[1])
    return {w: float(np.median(t) / one) for w, t in times.items()}


def break_even(costs: dict[int, float]) -> list[str]:
    """For each depth k, the acceptance rate a at which (1 - a^(k+1)) / (1 - a) tokens per pass pay for its cost."""
    out = []
    for k in range(1, max(costs)):
        c = costs[k + 1]
        grid = np.linspace(0.0, 0.999, 1000)
        paying = grid[(1 - grid ** (k + 1)) / (1 - grid) >= c]
        out.append(f"k={k}: pass {c:.2f} steps, pays from acceptance {paying[0]:.2f}" if paying.size else f"k={k}: pass {c:.2f} steps, never pays")
    return out


def main() -> None:
    ap = harness.arguments(__doc__, model="qwen-coder-plain", text=False, work="edgeq-bench-spec", new_tokens=96, runs=2)
    ap.add_argument("--skip-onnx", action="store_true", help="leave out the ONNX pair (its exports take minutes)")
    ap.add_argument("--only", default="lookup,gguf-pair,onnx-pair", help="comma-separated rows: lookup, gguf-pair, onnx-pair")
    args = harness.parse(ap)
    rows = set(args.only.split(",")) - ({"onnx-pair"} if args.skip_onnx else set())
    verdicts = harness.Verdicts()
    if "lookup" in rows:
        lookup_rows(args, verdicts)
    if "gguf-pair" in rows:
        target = harness.exported(args.model, args.work, "gguf", "Q8_0")
        draft = harness.exported(args.model, args.work, "gguf", "Q4_0")
        with edgeq.load(target, threads=args.threads, draft=draft) as model:
            compare("GGUF Q4_0 drafting for Q8_0, code", model, CODE, args, verdicts)
            compare("GGUF Q4_0 drafting for Q8_0, chat", model, CHAT, args, verdicts)
    if "onnx-pair" in rows:
        target = harness.export_once(args.model, args.work / "onnx-int8", format="onnx", precision="int8", rounding="nearest")
        draft = harness.export_once(args.model, args.work / "onnx-int4", format="onnx", precision="int4", rounding="nearest")
        with edgeq.load(target, threads=args.threads, draft=draft) as model:
            compare("ONNX int4 drafting for int8, code (greedy)", model, CODE, args, verdicts, speed_bar=None, deep=True)
            spec = model.speculation
            verdicts.info(f"ONNX int8: greedy verification exact up to {spec.exact_width} tokens per pass"
                          f"{', greedy steps taken as 2-row batches' if spec.paired else ''}{': ' + spec.inexact_reason if spec.inexact_reason else ''}")
            compare("ONNX int4 drafting for int8, code (sampled)", model, CODE, args, verdicts, speed_bar=None, temperature=0.7, seed=1)
    verdicts.exit()


def lookup_rows(args, verdicts) -> None:
    q4km = harness.exported(args.model, args.work, "gguf", "Q4_K_M")
    with edgeq.load(q4km, threads=args.threads, draft="lookup") as model:
        costs = pass_costs(model)
        print(f"{q4km.name}: a verification pass of w tokens costs (single steps): " +
              ", ".join(f"w={w} {c:.2f}" for w, c in costs.items()))
        for line in break_even(costs):
            verdicts.info(line)
        width, why = probe_exact_width(model.engine, 9)
        verdicts.info(f"greedy verification exact up to {width} tokens per pass{': ' + why if why else ''}")
        compare("lookup, editing/extraction prompts", model, EDIT, args, verdicts, accept_bar=4.0)
        compare("lookup, free chat", model, CHAT, args, verdicts)
        compare("lookup, code", model, CODE, args, verdicts)


if __name__ == "__main__":
    main()
