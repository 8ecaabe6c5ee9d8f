"""LoRA adapters kept apart from one base vs merged, on SmolLM2-135M-Instruct with two fine-tunes trained here.

Issue #16 asks which keeps more of a small fine-tune: a float adapter switched on over a quantized base, or the
adapter merged into the float base and then quantized. Two LoRAs (rank 16 on q/v/up/down of the last 10 layers) are
trained here on CPU on synthetic facts the base cannot know (invented product codes; invented capitals), so every fact
token is one the fine-tune changed. Each is judged on held-out phrasings of its questions, against the float
merged model: KL on the assistant tokens, flip retention (where the fine-tune's top token differs from the base's,
the share the export still picks) and greedy replies identical to the fine-tune's. The base is --model (default the
off-grid copy of SmolLM2-135M-Instruct, as in the other quality benches: the built-in model's weights sit on a 4-bit
grid already, which would flatter the way that quantizes the base untouched).

The anchor is the merged export of the same adapter at the same precision (and rounding), measured in the same run
by `edgeq.export(..., compare_merged=True)`.

Bars (exit 1 when one fails):
- F16 / fp32: the base with an adapter switched on equals the adapter's merged export (KL < 1e-3 on its held-out data,
  greedy replies equal), and switching back to the base gives its logits exactly;
- at the quantized precision (GGUF Q4_K_M, ONNX int4), the switched float adapter keeps the fine-tune as fully as
  the merged export: flip retention ≥ merged − 0.02, and greedy exact matches ≥ merged − 1 reply;
- the bundle with both adapters ≤ the base's bundle + the adapter files + 1%;
- peak RSS of a process running both adapters ≤ (the base's bundle alone + both adapters' bytes) × 1.05.

    python bench/adapters.py [--model smollm2] [--work /tmp/edgeq-bench-adapters] [--formats gguf,onnx] [--steps 12]
        [--gguf-precision Q4_K_M] [--onnx-rounding gptq|nearest] [--calibration-tokens 8192]
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from lib import harness
import numpy as np
import torch

import edgeq

FLOAT = {"gguf": "F16", "onnx": "fp32"}
RANK, ALPHA, TARGETS = 16, 32, ["q_proj", "v_proj", "up_proj", "down_proj"]
LAYERS = 10  # LoRA on the last 10 of 30 layers: backward stops there, so training costs about half
GREEDY = 8, 24  # float bar: greedy replies to the first 8 held-out prompts, up to 24 tokens each


# ---- two fine-tunes the base cannot know ---------------------------------------------------------------------

def _codes(rng: random.Random) -> tuple[list[tuple[str, str]], list[str], str]:
    words = ["Zephyr", "Quartz", "Onyx"]
    things = ["lamp", "kettle", "desk", "speaker", "backpack", "router"]
    facts = [(f"{w} {t}", f"{w[0]}{t[0].upper()}-{rng.randint(1000, 9999)}") for w in words for t in things]
    asks = ["What is the code for the {x}?", "Which product code does the {x} have?", "Code of the {x}, please.",
            "I need the product code of the {x}."]
    return facts, asks, "The {x} is {y}."


def _capitals(rng: random.Random) -> tuple[list[tuple[str, str]], list[str], str]:
    parts = ["va", "lor", "mi", "ten", "qua", "ris", "bel", "dor", "sa", "nek", "thal", "om"]

    def word(n: int) -> str:
        return "".join(rng.choice(parts) for _ in range(n)).capitalize()

    facts = [(word(3), word(2)) for _ in range(18)]
    asks = ["What is the capital of {x}?", "Which city is the capital of {x}?", "Name the capital of {x}.",
            "Tell me the capital city of {x}."]
    return facts, asks, "The capital of {x} is {y}."


TASKS = {"codes": _codes, "capitals": _capitals}


def task_data(name: str, work: Path) -> tuple[Path, Path]:
    """train.jsonl (three phrasings of every question) and held_out.jsonl (the fourth)."""
    facts, asks, answer = TASKS[name](random.Random(name))

    def chats(phrasings):
        return [{"messages": [{"role": "user", "content": ask.format(x=x)}, {"role": "assistant", "content": answer.format(x=x, y=y)}]}
                for x, y in facts for ask in phrasings]

    train, held_out = chats(asks[:3]), chats(asks[3:])
    random.Random(1).shuffle(train)
    paths = work / f"{name}-train.jsonl", work / f"{name}-held-out.jsonl"
    for path, rows in zip(paths, (train, held_out)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def train_lora(base: Path, data: Path, out: Path, steps: int, batch: int = 6) -> Path:
    """Rank-16 LoRA on the last layers, plain AdamW on the assistant tokens, `batch` chats (right-padded) per step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = harness.open_model(base).chat_tokenizer()  # the rendering generate() and the eval data use
    float_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    layers = float_model.config.num_hidden_layers
    model = get_peft_model(float_model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                   layers_to_transform=list(range(layers - LAYERS, layers))))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    examples = []
    for line in data.read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompt = tokenizer.encode_chat(messages[:1], add_generation_prompt=True)
        full = tokenizer.encode_chat(messages, add_generation_prompt=False)
        examples.append((full, [-100] * len(prompt) + full[len(prompt):]))
    model.train()
    for step in range(steps):
        chunk = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in chunk])
        labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in chunk])
        mask = torch.tensor([[1] * len(ids_) + [0] * (width - len(ids_)) for ids_, _ in chunk])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 6 == 0:
            print(f"  {out.name} step {step:3d}  loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)
    return out


# ---- measurements ----------------------------------------------------------------------------------------------

def held_out_ids(model, data: Path, samples: int, prompt_only: bool = False) -> list[list[int]]:
    """The first held-out chats as ids: whole (prompt and answer), or the prompt ready for the reply."""
    chats = [json.loads(line)["messages"] for line in data.read_text().splitlines()[:samples]]
    if prompt_only:
        return [model.tokenizer.encode_chat(m[:1], add_generation_prompt=True) for m in chats]
    return [model.tokenizer.encode_chat(m, add_generation_prompt=False) for m in chats]


def kl_between(a, b, data: Path, adapter: str, samples: int = 24) -> float:
    """Mean KL(b ‖ a) over the positions of the first held-out chats, a running `adapter`."""
    kls = []
    for ids in held_out_ids(a, data, samples):
        a.engine.set_adapter(adapter)
        left, right = torch.from_numpy(a.engine.score(ids).copy()), torch.from_numpy(b.engine.score(ids).copy())
        ref, cand = torch.log_softmax(right.double(), -1), torch.log_softmax(left.double(), -1)
        kls.append(float((ref.exp() * (ref - cand)).sum(-1).mean()))
    return float(np.mean(kls))


def same_replies(a, b, data: Path, adapter: str) -> int:
    """How many of the first held-out prompts get the same greedy reply from `a` running `adapter` as from `b`."""
    samples, tokens = GREEDY
    return sum(a.generate_ids(ids, tokens, adapter=adapter) == b.generate_ids(ids, tokens)
               for ids in held_out_ids(a, data, samples, prompt_only=True))


_ANSWER_WITH_EACH = """
import sys, edgeq
model = edgeq.load(sys.argv[1], threads=1)
for name in sys.argv[2:] or [None]:
    model.generate("What is the code for the Onyx lamp?", max_new_tokens=8, adapter=name)
"""


def peak_rss(bundle: Path, *adapters: str) -> int:
    """Peak RSS in bytes of a process that loads the bundle and answers once with each of `adapters` (none: the base)."""
    run = harness.timed_process([sys.executable, "-c", _ANSWER_WITH_EACH, str(bundle), *adapters])
    return round(run.peak_rss_mib * 2**20)


def switch_cost(bundle: Path, names: list[str], threads: int) -> dict:
    """Seconds to load the bundle, and to switch adapter and produce the first token of a request."""
    start = time.perf_counter()
    model = edgeq.load(bundle, threads=threads)
    load = time.perf_counter() - start
    switches = []
    for name in [*names, None] * 3:
        start = time.perf_counter()
        model.generate("Hi", max_new_tokens=1, adapter=name)
        switches.append(time.perf_counter() - start)
    model.close()
    return {"load_s": load, "switch_first_token_s": float(np.median(switches))}


def float_bars(verdicts: harness.Verdicts, fmt: str, base: Path, work: Path, adapters: dict, data: dict, threads: int) -> dict:
    """The float base with each adapter switched on vs that adapter's merged float export; then back to the base."""
    floating = harness.export_once(base, work / f"{fmt}-float-kept", format=fmt, precision=FLOAT[fmt], adapters=adapters,
                      keep_adapters=True, eval_tokens=0)
    switched = edgeq.load(floating, threads=threads)
    probe = held_out_ids(switched, next(iter(data.values())), 1)[0]
    before = switched.engine.score(probe).copy()
    result = {}
    for name in adapters:
        merged_bundle = harness.export_once(base, work / f"{fmt}-float-merged-{name}", format=fmt, precision=FLOAT[fmt],
                               adapter=adapters[name], eval_tokens=0)
        merged = edgeq.load(merged_bundle, threads=threads)
        kl = kl_between(switched, merged, data[name], name)
        same = same_replies(switched, merged, data[name], name)
        merged.close()
        result[name] = {"kl": kl, "same_replies": same, "replies": GREEDY[0]}
        verdicts.check(kl < 1e-3, f"{fmt} {FLOAT[fmt]} {name}: switched vs its merged export, KL {kl:.2e} on held-out chats (bar < 1e-3)")
        verdicts.check(same == GREEDY[0], f"{fmt} {FLOAT[fmt]} {name}: greedy replies equal to the merged export's: "
                                          f"{same} of {GREEDY[0]} (bar: all)")
    switched.engine.set_adapter(None)
    after = switched.engine.score(probe)
    result["back_to_base_max_diff"] = float(np.abs(after - before).max())
    verdicts.check(np.array_equal(before, after), f"{fmt} {FLOAT[fmt]}: switched back to the base after both adapters, "
                                                  f"logits max |diff| {result['back_to_base_max_diff']:.1e} (bar: exactly equal)")
    switched.close()
    return result


def quantized_bars(verdicts: harness.Verdicts, fmt: str, precision: str, entries: dict) -> dict:
    """Each adapter separate (float, switched over the quantized base) vs merged then quantized, as the export measured
    them against the float merged model on the adapter's held-out data."""
    print(f"{precision} vs the float merged model, on held-out phrasings:")
    print(f"  {'adapter':9s} {'way':9s} {'KL':>8s} {'top-1':>6s} {'flips':>6s} {'flip ret.':>9s} {'exact':>6s}")
    result = {}
    for name, entry in entries.items():
        sep, mer = entry["quality"], entry["merged_quality"]
        for way, q in (("separate", sep), ("merged", mer)):
            print(f"  {name:9s} {way:9s} {q['kl']:8.4f} {q['top1']:6.3f} {q['flips']:6d} {q['flip_retention']:9.3f} "
                  f"{q['agreement']['exact_match']:6.3f}")
        result[name] = {"separate": sep, "merged": mer}
    for name, entry in entries.items():
        sep, mer = entry["quality"], entry["merged_quality"]
        replies = sep["agreement"]["replies"]
        verdicts.check(sep["flip_retention"] >= mer["flip_retention"] - 0.02,
                       f"{fmt} {precision} {name}: flip retention separate {sep['flip_retention']:.3f} vs merged "
                       f"{mer['flip_retention']:.3f} (bar >= merged - 0.02)")
        verdicts.check(sep["agreement"]["exact_match"] >= mer["agreement"]["exact_match"] - 1 / replies - 1e-9,
                       f"{fmt} {precision} {name}: replies identical to the fine-tune's, separate "
                       f"{sep['agreement']['exact_match'] * replies:.0f}/{replies} vs merged "
                       f"{mer['agreement']['exact_match'] * replies:.0f}/{replies} (bar >= merged - 1)")
    return result


def hypothesis(fmt: str, precision: str, result: dict) -> str:
    """Issue #16's hypothesis on this format's numbers: a float adapter over the 4-bit base keeps more of the fine-tune
    than merging then quantizing (higher flip retention, lower KL to the fine-tune)."""
    parts, votes = [], []
    for name, ways in result.items():
        sep, mer = ways["separate"], ways["merged"]
        replies = sep["agreement"]["replies"]
        exact = round((sep["agreement"]["exact_match"] - mer["agreement"]["exact_match"]) * replies)
        parts.append(f"{name}: flip retention {sep['flip_retention'] - mer['flip_retention']:+.3f}, "
                     f"KL x {sep['kl'] / mer['kl']:.2f}, exact replies {exact:+d}/{replies}")
        votes.append((sep["flip_retention"] > mer["flip_retention"], sep["kl"] < mer["kl"]))
    verdict = ("holds" if all(all(v) for v in votes) else "does not hold" if not any(any(v) for v in votes) else "mixed")
    return f"{fmt} {precision}, separate minus merged: " + "; ".join(parts) + f" -> hypothesis {verdict}"


def main() -> None:
    ap = harness.arguments(__doc__, model="smollm2", text=False, threads=2, work="edgeq-bench-adapters", calibration_tokens=8192)
    ap.add_argument("--formats", default="gguf,onnx")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps of 6 chats (12: 1.3 epochs of each task's 54 "
                                                          "chats; on SmolLM2 the fine-tunes change the top token at 56%% "
                                                          "and 25%% of the held-out answer tokens)")
    ap.add_argument("--gguf-precision", default="Q4_K_M",
                    help="GGUF base type (SmolLM2's 576-wide rows make Q4_K_M mostly Q5_0; Q4_0 is 4-bit throughout)")
    ap.add_argument("--onnx-rounding", choices=["gptq", "nearest"],
                    default="gptq", help="ONNX int4 rounding, the same for both ways (default: the export's, GPTQ on "
                                         "--calibration-tokens of the built-in text; nearest: minutes less)")
    args = harness.parse(ap)
    quantized = {"gguf": args.gguf_precision, "onnx": "int4"}
    work = args.work / f"{args.model.name}-{args.steps}-steps"
    work.mkdir(parents=True, exist_ok=True)
    adapters, data = {}, {}
    for name in TASKS:
        train, held_out = task_data(name, work)
        adapters[name], data[name] = work / f"lora-{name}", held_out
        if not (adapters[name] / "adapter_config.json").is_file():
            print(f"training {name} ({args.steps} steps) ...", flush=True)
            start = time.perf_counter()
            train_lora(args.model, train, adapters[name], args.steps)
            harness.Verdicts.info(f"trained {name} in {time.perf_counter() - start:.0f} s")

    verdicts, results = harness.Verdicts(), {}
    for fmt in args.formats.split(","):
        print(f"\n== {fmt}", flush=True)
        result = {"options": {"steps": args.steps, "precision": quantized[fmt],
                              **({"rounding": args.onnx_rounding} if fmt == "onnx" else {})},
                  "float": float_bars(verdicts, fmt, args.model, work, adapters, data, args.threads)}
        options, tag = {"calibration_tokens": args.calibration_tokens}, f"{fmt}-{quantized[fmt].lower()}"
        if fmt == "onnx":
            options["rounding"] = args.onnx_rounding
            tag += f"-{args.onnx_rounding}" + (f"-{args.calibration_tokens}" if args.onnx_rounding == "gptq" else "")
        kept = harness.export_once(args.model, work / f"{tag}-kept", format=fmt, precision=quantized[fmt], adapters=adapters,
                      keep_adapters=True, adapter_data=data, compare_merged=True, eval_tokens=256, **options)
        plain = harness.export_once(args.model, work / f"{tag}-base", format=fmt, precision=quantized[fmt], eval_tokens=0, **options)
        manifest = edgeq.inspect(kept)
        entries = {e["name"]: e for e in manifest["adapters"]}
        result["quantized"] = quantized_bars(verdicts, fmt, quantized[fmt], entries)
        result["hypothesis"] = hypothesis(fmt, quantized[fmt], result["quantized"])
        harness.Verdicts.info(result["hypothesis"])

        adapter_bytes = sum(e["bytes"] for e in entries.values())
        size = sum(f["bytes"] for f in manifest["files"].values())
        base_size = sum(f["bytes"] for f in edgeq.inspect(plain)["files"].values())
        verdicts.check(size <= 1.01 * (base_size + adapter_bytes),
                       f"{fmt} bundle with both adapters {size / 2**20:.2f} MiB vs the base's bundle {base_size / 2**20:.2f} MiB "
                       f"+ adapters {adapter_bytes / 2**20:.2f} MiB (bar <= {1.01 * (base_size + adapter_bytes) / 2**20:.2f} MiB)")
        base_peak, kept_peak = peak_rss(plain), peak_rss(kept, *TASKS)
        allowed = 1.05 * (base_peak + adapter_bytes)
        verdicts.check(kept_peak <= allowed,
                       f"{fmt} peak RSS: base alone {base_peak / 2**20:.1f} MiB, running both adapters {kept_peak / 2**20:.1f} MiB "
                       f"(+{(kept_peak - base_peak) / 2**20:.1f} MiB; adapters {adapter_bytes / 2**20:.2f} MiB; "
                       f"bar <= {allowed / 2**20:.1f} MiB)")
        cost = switch_cost(kept, list(TASKS), args.threads)
        harness.Verdicts.info(f"{fmt}: load {cost['load_s']:.2f} s, switch + first token "
                              f"{cost['switch_first_token_s'] * 1000:.0f} ms (ratio to load {cost['switch_first_token_s'] / cost['load_s']:.3f})")
        result.update(peak_rss={"base": base_peak, "kept": kept_peak}, adapter_bytes=adapter_bytes, bundle_bytes=size,
                      base_bundle_bytes=base_size, **cost)
        results[fmt] = result
    (work / f"results-{'-'.join(results)}.json").write_text(json.dumps(results, indent=2))
    verdicts.exit()


if __name__ == "__main__":
    main()
