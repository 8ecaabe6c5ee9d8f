"""A release of two SmolLM2-sized fine-tunes × three devices (issue 19 bars): a second `edgeq release` with
nothing changed finishes in under 10 s, and changing one device's profile rebuilds that device's cells only.

The anchor is the first (cold) run of the same release in the same session, in a fresh cache, so the ratio
shows what resumption saves. Models: the model given (default: edgeq's built-in SmolLM2-135M-Instruct) as
"assistant", and the same base with a random rank-8 PEFT LoRA on q/v as "support". Devices: pixel-8 (planned),
raspberry-pi-5 (Q8_0) and "board", a copy of raspberry-pi-5's profile (Q4_0) whose bandwidth the third run
changes. Every run is the `edgeq` command in a fresh process, as a user runs it.

    python bench/release_resume.py [--model smollm2-plain] [--work /tmp/edgeq-release-bench]
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

from lib import harness

BARS = {"second run seconds": 10.0}
RELEASE = """
output = "out"
eval_tokens = 512
cache = "cache"

[[model]]
name = "assistant"
path = "{model}"

[[model]]
name = "support"
path = "{model}"
adapter = "support-lora"

[[device]]
name = "pixel-8"

[[device]]
name = "raspberry-pi-5"
precision = "Q8_0"

[[device]]
name = "board"
profile = "board.toml"
precision = "Q4_0"
"""


def write_lora(model: Path, folder: Path) -> None:
    """A rank-8 LoRA on q_proj/v_proj with random A and B (PEFT's init_lora_weights=False), as PEFT saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(folder)


def release(work: Path) -> tuple[float, dict]:
    """One `edgeq release` in a fresh process: wall seconds and the report."""
    start = time.perf_counter()
    done = subprocess.run([shutil.which("edgeq") or "edgeq", "release", str(work / "release.toml")], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"edgeq release failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    print(done.stdout.strip().splitlines()[-2], flush=True)
    return seconds, json.loads((work / "out" / "report.json").read_text())


def main() -> None:
    ap = harness.arguments(__doc__, model="smollm2-plain", text=False, threads=None, work="edgeq-release-bench")
    args = harness.parse(ap, fresh_work=True)
    work = args.work
    write_lora(args.model, work / "support-lora")
    board = files("edgeq.devices").joinpath("raspberry-pi-5.toml").read_text()
    (work / "board.toml").write_text(board)
    (work / "release.toml").write_text(RELEASE.format(model=args.model))

    first, report = release(work)
    cells = len(report["cells"])
    second, report = release(work)
    rebuilt_second = [t["task"] for t in report["tasks"]]
    (work / "board.toml").write_text(board.replace("bandwidth_gbps = 17.1", "bandwidth_gbps = 34.2"))
    third, report = release(work)
    rebuilt_third = sorted(t["task"] for t in report["tasks"])

    harness.Verdicts.info(f"{args.model.name}: {cells} cells; first run {first:.1f} s (sensitivity measured cold), "
                          f"second {second:.1f} s ({second / first:.3f} x the first), board's profile changed {third:.1f} s")
    verdicts = harness.Verdicts()
    verdicts.check(report["summary"]["pass"] == cells, f"every cell passes ({report['summary']})")
    verdicts.at_most("second run seconds", second, BARS["second run seconds"], ".1f")
    verdicts.check(rebuilt_second == [], f"the second run runs no task ({rebuilt_second or 'none'})")
    verdicts.check(rebuilt_third == ["cell:assistant/board", "cell:support/board"],
                   f"a changed profile rebuilds that device's cells only ({', '.join(rebuilt_third)})")
    verdicts.exit()


if __name__ == "__main__":
    main()
