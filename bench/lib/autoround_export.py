"""AutoRound's GGUF export, run by the Python of a venv that has `auto-round` (never edgeq's own environment).

AutoRound pins its own transformers and accelerate, so `gguf_gptq.py --autoround-python VENV/bin/python` runs this
file in that venv. It takes the very token windows edgeq calibrates on (a JSON list of id lists, written by the
bench), so both sides see the same text, and AutoRound's recipe is fixed by the bench: signed-gradient rounding
offsets and min/max scales learned block by block (`iters` steps over batches of `batch_size` windows of `seqlen`
tokens), written as llama.cpp's `q4_k_m`.

    VENV/bin/python bench/lib/autoround_export.py ARGS.json
    ARGS.json: {"model", "windows", "output", "format", "iters", "nsamples", "seqlen", "batch_size", "threads"}

Prints one JSON line: the GGUF written and the seconds AutoRound took.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    args = json.loads(Path(sys.argv[1]).read_text())
    import torch
    from auto_round import AutoRound

    torch.set_num_threads(args["threads"])
    windows = [torch.tensor([ids]) for ids in json.loads(Path(args["windows"]).read_text()) if len(ids) == args["seqlen"]]
    if len(windows) < args["nsamples"]:
        raise SystemExit(f"autoround: {len(windows)} windows of {args['seqlen']} tokens given, the recipe takes {args['nsamples']}")
    started = time.perf_counter()
    rounder = AutoRound(args["model"], scheme=args["format"], dataset=windows[:args["nsamples"]], iters=args["iters"],
                        nsamples=args["nsamples"], seqlen=args["seqlen"], batch_size=args["batch_size"], device_map="cpu")
    rounder.quantize_and_save(args["output"], format=args["format"])
    written = sorted(Path(args["output"]).rglob("*.gguf"))
    if len(written) != 1:
        raise SystemExit(f"autoround: expected one .gguf under {args['output']}, found {[str(p) for p in written]}")
    print(json.dumps({"gguf": str(written[0]), "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
