"""LoRA adapters kept apart from one base vs merged, on SmolLM2-135M-Instruct with two fine-tunes trained here.

Issue #16 asks which keeps more of a small fine-tune: a float adapter switched on over a quantized base, or the
adapter merged into the float base and then quantized. Two LoRAs (rank 16 on q/v/up/down of the last 10 layers) are trained here on
CPU (minutes on an idle machine) on synthetic facts the base cannot know (invented product codes; invented capitals), so every fact
token is one the fine-tune changed. Each is judged on held-out phrasings of its questions, against the float
merged model: KL on the assistant tokens, flip retention (where the fine-tune's top token differs from the base's,
the share the export still picks) and greedy replies identical to the fine-tune's.

The anchor is the merged export of the same adapter at the same precision, measured in the same run.

Bars (exit 1 when one fails):
- F16: the base with an adapter switched on equals the adapter's merged F16 export (KL < 1e-3 on its data);
- at the quantized precision, the switched float adapter keeps the fine-tune as fully as the merged export:
  flip retention ≥ merged − 0.02, and greedy exact matches ≥ merged − 1 reply;
- peak RSS of a process running both adapters ≤ the base alone + 2 × the adapters' bytes + 5%.

    python bench/adapters.py [--work /tmp/edgeq-bench-adapters] [--formats gguf,onnx] [--steps 36]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import harness
import numpy as np
import torch

import edgeq

QUANTIZED = {"gguf": "Q4_K_M", "onnx": "int4"}
FLOAT = {"gguf": "F16", "onnx": "fp32"}
RANK, ALPHA, TARGETS = 16, 32, ["q_proj", "v_proj", "up_proj", "down_proj"]
LAYERS = 10  # LoRA on the last 10 of 30 layers: backward stops there, so training costs about half


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

def kl_between(a, b, data: Path, adapter: str, samples: int = 24) -> float:
    """Mean KL(b ‖ a) over the positions of the first held-out chats, a running `adapter`."""
    kls = []
    for line in data.read_text().splitlines()[:samples]:
        ids = a.tokenizer.encode_chat(json.loads(line)["messages"], add_generation_prompt=False)
        a.engine.set_adapter(adapter)
        left, right = torch.from_numpy(a.engine.score(ids).copy()), torch.from_numpy(b.engine.score(ids).copy())
        ref, cand = torch.log_softmax(right.double(), -1), torch.log_softmax(left.double(), -1)
        kls.append(float((ref.exp() * (ref - cand)).sum(-1).mean()))
    return float(np.mean(kls))


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


def switch_cost(bundle: Path, names: list[str]) -> dict:
    """Seconds to load the bundle, and to switch adapter and produce the first token of a request."""
    start = time.perf_counter()
    model = edgeq.load(bundle, threads=2)
    load = time.perf_counter() - start
    switches = []
    for name in [*names, None] * 3:
        start = time.perf_counter()
        model.generate("Hi", max_new_tokens=1, adapter=name)
        switches.append(time.perf_counter() - start)
    model.close()
    return {"load_s": load, "switch_first_token_s": float(np.median(switches))}


def export(base: Path, out: Path, fmt: str, precision: str, adapters: dict, data: dict, merged: bool) -> Path:
    if not (out / "edgeq.json").is_file():
        edgeq.export(base, adapters=adapters, keep_adapters=True, adapter_data=data, compare_merged=merged, format=fmt,
                     precision=precision, output=out, eval_tokens=256)
    return out


def verdict(failures: list[str], ok: bool, text: str) -> None:
    print(f"[{'PASS' if ok else 'FAIL'}] {text}", flush=True)
    if not ok:
        failures.append(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeq-bench-adapters"))
    parser.add_argument("--formats", default="gguf,onnx")
    parser.add_argument("--steps", type=int, default=36, help="optimizer steps of 6 chats (4 epochs of each task)")
    parser.add_argument("--gguf-precision", default=QUANTIZED["gguf"],
                        help="GGUF base type (SmolLM2's 576-wide rows make Q4_K_M mostly Q5_0; Q4_0 is 4-bit throughout)")
    args = parser.parse_args()
    QUANTIZED["gguf"] = args.gguf_precision
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base = harness.default_model_path()
    adapters, data = {}, {}
    for name in TASKS:
        train, held_out = task_data(name, work)
        adapters[name], data[name] = work / f"lora-{name}", held_out
        if not (adapters[name] / "adapter_config.json").is_file():
            print(f"training {name} ({args.steps} steps) ...", flush=True)
            train_lora(base, train, adapters[name], args.steps)

    failures, results = [], {}
    for fmt in args.formats.split(","):
        print(f"\n== {fmt}", flush=True)
        floating = export(base, work / f"{fmt}-float-kept", fmt, FLOAT[fmt], adapters, {}, merged=False)
        kept = export(base, work / f"{fmt}-{QUANTIZED[fmt].lower()}-kept", fmt, QUANTIZED[fmt], adapters, data, merged=True)
        switched = edgeq.load(floating, threads=2)
        result = {"float": {}, "quantized": {}}
        for name in TASKS:
            out = work / f"{fmt}-float-merged-{name}"
            if not (out / "edgeq.json").is_file():
                edgeq.export(base, adapter=adapters[name], format=fmt, precision=FLOAT[fmt], output=out, eval_tokens=0)
            merged = edgeq.load(out, threads=2)
            kl = kl_between(switched, merged, data[name], name)
            merged.close()
            result["float"][name] = kl
            verdict(failures, kl < 1e-3, f"{fmt} {FLOAT[fmt]} {name}: switched vs its merged export, KL {kl:.2e} (bar < 1e-3)")
        switched.close()
        entries = {e["name"]: e for e in edgeq.inspect(kept)["adapters"]}
        print(f"{QUANTIZED[fmt]} vs the float merged model, on held-out phrasings:")
        print(f"  {'adapter':9s} {'way':9s} {'KL':>8s} {'top-1':>6s} {'flip ret.':>9s} {'exact':>6s}  ratio KL sep/merged")
        for name, entry in entries.items():
            sep, mer = entry["quality"], entry["merged_quality"]
            for way, q in (("separate", sep), ("merged", mer)):
                ratio = f"  {sep['kl'] / mer['kl']:.2f}" if way == "separate" else ""
                print(f"  {name:9s} {way:9s} {q['kl']:8.4f} {q['top1']:6.3f} {q['flip_retention']:9.3f} "
                      f"{q['agreement']['exact_match']:6.3f}{ratio}")
            result["quantized"][name] = {"separate": sep, "merged": mer}
        for name, entry in entries.items():
            sep, mer = entry["quality"], entry["merged_quality"]
            replies = sep["agreement"]["replies"]
            verdict(failures, sep["flip_retention"] >= mer["flip_retention"] - 0.02,
                    f"{fmt} {QUANTIZED[fmt]} {name}: flip retention separate {sep['flip_retention']:.3f} vs merged "
                    f"{mer['flip_retention']:.3f} (bar ≥ merged - 0.02)")
            verdict(failures, sep["agreement"]["exact_match"] >= mer["agreement"]["exact_match"] - 1 / replies,
                    f"{fmt} {QUANTIZED[fmt]} {name}: replies identical to the fine-tune's, separate "
                    f"{sep['agreement']['exact_match']:.3f} vs merged {mer['agreement']['exact_match']:.3f} (bar ≥ merged - 1/{replies})")
        plain = work / f"{fmt}-{QUANTIZED[fmt].lower()}-base"
        if not (plain / "edgeq.json").is_file():
            edgeq.export(base, format=fmt, precision=QUANTIZED[fmt], output=plain, eval_tokens=0)
        adapter_bytes = sum(e["bytes"] for e in entries.values())
        base_peak, kept_peak = peak_rss(plain), peak_rss(kept, *TASKS)
        allowed = 1.05 * base_peak + 2 * adapter_bytes
        verdict(failures, kept_peak <= allowed,
                f"{fmt} peak RSS: base alone {base_peak / 2**20:.1f} MiB, running both adapters {kept_peak / 2**20:.1f} MiB "
                f"(ratio {kept_peak / base_peak:.3f}; adapters {adapter_bytes / 2**20:.2f} MiB; bar ≤ {allowed / 2**20:.1f} MiB)")
        cost = switch_cost(kept, list(TASKS))
        size = sum(f["bytes"] for f in edgeq.inspect(kept)["files"].values())
        print(f"bundle {size / 2**20:.1f} MiB ({adapter_bytes / 2**20:.2f} MiB of adapters); load {cost['load_s']:.2f} s, "
              f"switch + first token {cost['switch_first_token_s'] * 1000:.0f} ms (ratio to load {cost['switch_first_token_s'] / cost['load_s']:.3f})")
        result.update(peak_rss={"base": base_peak, "kept": kept_peak, "adapter_bytes": adapter_bytes}, bundle_bytes=size, **cost)
        results[fmt] = result
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print("all bars met" if not failures else f"{len(failures)} bar(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
