"""Does the fine-tune survive quantization? A LoRA trained here in a few minutes on CPU, exported at two sizes,
judged on its own held-out chats.

The task is synthetic and in-process (no downloads): a support bot that answers with the product code of an
invented product ("What is the code for the Zephyr lamp?" → "The Zephyr lamp is ZL-4471."). The base model
(edgeq's built-in SmolLM2-135M-Instruct) cannot know the codes, so every code token is a token the fine-tune
changed, which is what flip retention counts.

    pip install 'edgeq[peft]' && python examples/finetune_retention.py [workdir]
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import edgeq
from edgeq.default_model import default_model_path

WORDS = ["Zephyr", "Nimbus", "Quartz", "Ember", "Tundra", "Saffron", "Cobalt", "Juniper", "Marlow", "Onyx", "Pebble", "Rowan"]
THINGS = ["lamp", "kettle", "desk", "speaker", "backpack", "router"]
ASKS = ["What is the code for the {p}?", "Which product code does the {p} have?", "Code of the {p}, please.",
        "I need the product code of the {p}."]


def products() -> dict[str, str]:
    rng = random.Random(0)
    return {f"{w} {t}": f"{w[0]}{t[0].upper()}-{rng.randint(1000, 9999)}" for w in WORDS for t in THINGS}


def chats(codes: dict[str, str], asks: list[str]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": ask.format(p=p)},
                          {"role": "assistant", "content": f"The {p} is {code}."}]}
            for p, code in codes.items() for ask in asks]


def train_lora(base: Path, data: list[dict], out: Path) -> Path:
    """Rank-16 LoRA on the attention and MLP projections: one pass of plain AdamW over the chats, the loss on the
    assistant's tokens only."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgeq.intake import open_model

    torch.manual_seed(0)
    tokenizer = open_model(base).chat_tokenizer()  # the rendering edgeq's runtime uses, so training matches it
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for chat in data:
        prompt = tokenizer.encode_chat(chat["messages"][:1])
        full = tokenizer.encode_chat(chat["messages"], add_generation_prompt=False)
        labels = [-100] * len(prompt) + full[len(prompt):]
        loss = model(input_ids=torch.tensor([full]), labels=torch.tensor([labels])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if len(losses) % 40 == 0:
            print(f"  {len(losses):3d} chats  mean loss of the last 40 {sum(losses[-40:]) / 40:.3f}", flush=True)
    model.save_pretrained(out)
    return out


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    base = default_model_path()
    codes = products()
    train, held_out = chats(codes, ASKS[:3]), chats(codes, ASKS[3:])  # held-out phrasing of the same questions
    random.Random(1).shuffle(train)
    (work / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in train))
    (work / "held_out.jsonl").write_text("".join(json.dumps(c) + "\n" for c in held_out))
    adapter = work / "lora"
    if not (adapter / "adapter_config.json").is_file():
        print("training the LoRA (a few minutes on CPU) ...")
        train_lora(base, train, adapter)

    bundles = []
    for name, options in {"q4_0": {"precision": "Q4_0"}, "q8_0": {"precision": "Q8_0"},
                          "planned-retention": {"min_retention": 0.95}}.items():
        out = work / name
        if not out.exists():
            print(f"exporting {name} ...")
            edgeq.export(base, adapter=adapter, format="gguf", calibration=work / "train.jsonl", eval_data=work / "held_out.jsonl",
                         output=out, eval_tokens=0, allow_quality_miss=True, **options)
        bundles.append(out)
    print()
    for bundle in bundles:
        q = edgeq.inspect(bundle)["finetune_quality"]
        size = sum(f["bytes"] for f in edgeq.inspect(bundle)["files"].values())
        print(f"{bundle.name:18s} {size / 2**20:7.1f} MiB  flip retention {q['flip_retention']:.3f}  "
              f"noise/shift {q['noise_to_shift']:.3f}  replies exact {q['agreement']['exact_match']:.2f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "finetune-retention"))
