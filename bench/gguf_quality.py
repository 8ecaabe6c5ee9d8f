"""edgeq's GGUF quantization vs llama.cpp's own convert script + llama-quantize, same checkpoint.

Both files are measured by the same edgeq evaluator (KL, top-1, perplexity against the torch
reference) on the same token windows; the reference logits are computed once. Bars (issue 2):
F16 KL < 0.001 and top-1 >= 0.99; edgeq's Q8_0 / Q4_K_M KL within 10% of llama.cpp's.
With --imatrix, edgeq's `calibration=` is compared with llama-imatrix + llama-quantize --imatrix
on the same calibration text (taken from the end of the eval file, disjoint from the eval windows).

    LLAMA_CPP_BIN=... LLAMA_CPP_SRC=... python bench/gguf_quality.py [--imatrix]
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import anchors

import edgeq
from edgeq.converters.gguf_quantize import read_tensor_types
from edgeq.evaluate import QualityAccumulator
from edgeq.importance import calibration_windows
from edgeq.intake import open_model
from edgeq.runtimes.llamacpp import LlamaCppEngine
from edgeq.runtimes.torch import TorchEngine

DEFAULT_MODEL = Path("~/.cache/edgeq/models/smollm2-135m-instruct-offgrid").expanduser()
DEFAULT_TEXT = Path("/work/shared/data/wikitext-2/valid.txt")
KL_RATIO_BAR = 1.10


def calibration_text(text: Path, work: Path, chars: int) -> Path:
    """The last `chars` characters of the eval text: calibration never sees the eval windows."""
    body = text.read_text(encoding="utf-8", errors="replace")
    out = work / "calibration.txt"
    out.write_text(body[-chars:], encoding="utf-8")
    return out


def llamacpp_files(model: Path, work: Path, types: list[str], calibration: Path | None, calib_tokens: int,
                   threads: int) -> dict[str, Path]:
    """llama.cpp's own pipeline: convert_hf_to_gguf.py --outtype f16, [llama-imatrix,] llama-quantize per type."""
    f16 = work / "llamacpp-F16.gguf"
    argv, env = anchors.convert_command(model, f16, "f16")
    anchors.run(argv, env, work / "convert.log")
    files = {"F16": f16}
    imatrix = None
    if calibration:
        imatrix = work / "imatrix.gguf"
        argv = anchors.imatrix_command(f16, calibration, imatrix, 512, calib_tokens // 512, threads)
        anchors.run(argv, log=work / "imatrix.log")
    for t in types:
        if t == "F16":
            continue
        out = work / f"llamacpp-{t}.gguf"
        anchors.run(anchors.quantize_command(f16, out, t, threads=threads), log=work / f"quantize-{t}.log")
        files[t] = out
        if imatrix:
            out = work / f"llamacpp-{t}-imatrix.gguf"
            anchors.run(anchors.quantize_command(f16, out, t, imatrix, threads), log=work / f"quantize-{t}-imatrix.log")
            files[f"{t}+imatrix"] = out
    return files


def edgeq_files(model: Path, work: Path, types: list[str], calibration: Path | None, calib_tokens: int) -> dict[str, Path]:
    files = {}
    for t in types:
        bundle = edgeq.export(model, format="gguf", precision=t, output=work / f"edgeq-{t}", overwrite=True, eval_tokens=0, progress=False)
        files[t] = bundle / "model.gguf"
        if calibration and t != "F16":
            bundle = edgeq.export(model, format="gguf", precision=t, output=work / f"edgeq-{t}-imatrix", overwrite=True,
                                  eval_tokens=0, calibration=calibration, calibration_tokens=calib_tokens, progress=False)
            files[f"{t}+imatrix"] = bundle / "model.gguf"
    return files


def measure(path: Path, reference: list, windows: list[list[int]], threads: int):
    acc = QualityAccumulator()
    with LlamaCppEngine(path, threads=threads, n_ctx=len(windows[0])) as engine:
        for ref_logits, window in zip(reference, windows):
            acc.add(ref_logits, engine.score(window), window)
    return acc.result(ctx=len(windows[0]))


def type_differences(ours: Path, theirs: Path) -> str:
    a = read_tensor_types(ours, "F16")["tensors"]
    b = read_tensor_types(theirs, "F16")["tensors"]
    diff = [f"{n}:{a[n]['type']}/{b.get(n, {}).get('type')}" for n in a if a[n]["type"] != b.get(n, {}).get("type")]
    missing = sorted(set(a) ^ set(b))
    note = f"{len(diff)} tensors differ in type" + (f" (e.g. {', '.join(diff[:3])})" if diff else "")
    return note + (f"; names only in one file: {missing[:4]}" if missing else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--types", default="F16,Q8_0,Q4_K_M")
    ap.add_argument("--imatrix", action="store_true", help="also compare importance-matrix quantization")
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeq-bench-quality"))
    args = ap.parse_args()
    types = args.types.upper().split(",")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    calibration = calibration_text(args.text, args.work, 200_000) if args.imatrix else None
    ours = edgeq_files(args.model, args.work, types, calibration, args.calibration_tokens)
    theirs = llamacpp_files(args.model, args.work, types, calibration, args.calibration_tokens, args.threads)

    source = open_model(args.model)
    windows = calibration_windows(source.chat_tokenizer(), args.text, args.tokens, args.ctx)
    torch_ref = TorchEngine(source, threads=args.threads)
    reference = [torch_ref.score(w) for w in windows]
    torch_ref.close()
    print(f"model {args.model.name}, {len(windows)} windows x {args.ctx} tokens of {args.text.name}, threads {args.threads}")
    print(f"{'type':<16}{'tool':<10}{'bpw':>7}{'KL':>11}{'top-1':>8}{'ppl':>9}{'ppl_ref':>9}")
    verdicts = []
    for name, path in ours.items():
        if name not in theirs:
            continue
        rows = {}
        for tool, file in (("edgeq", path), ("llama.cpp", theirs[name])):
            q = rows[tool] = measure(file, reference, windows, args.threads)
            bpw = read_tensor_types(file, "F16")["bits_per_weight"]
            print(f"{name:<16}{tool:<10}{bpw:>7.3f}{q.kl:>11.6f}{q.top1:>8.4f}{q.ppl:>9.3f}{q.ppl_ref:>9.3f}")
        ratio = rows["edgeq"].kl / rows["llama.cpp"].kl if rows["llama.cpp"].kl else float("inf")
        print(f"{'':<16}KL ratio edgeq/llama.cpp = {ratio:.3f}; {type_differences(path, theirs[name])}")
        if name == "F16":
            q = rows["edgeq"]
            verdicts.append((f"F16 KL {q.kl:.6f} < 0.001 and top-1 {q.top1:.4f} >= 0.99", q.kl < 0.001 and q.top1 >= 0.99))
        else:
            verdicts.append((f"{name} KL ratio {ratio:.3f} <= {KL_RATIO_BAR}", ratio <= KL_RATIO_BAR))
    for text, ok in verdicts:
        print(f"[{'PASS' if ok else 'FAIL'}] {text}")


if __name__ == "__main__":
    main()
