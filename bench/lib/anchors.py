"""The tools edgeq is compared against: llama.cpp's own pipeline and onnxruntime-genai's model builder.

llama.cpp's tools are located from two environment variables (see bench/README.md) and are never a
dependency of edgeq itself:
  LLAMA_CPP_BIN  folder with the built llama-quantize, llama-imatrix, llama-perplexity, llama-bench
  LLAMA_CPP_SRC  llama.cpp source folder holding convert_hf_to_gguf.py (and gguf-py/)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from lib.harness import timed_process


def _folder(var: str, must_hold: str) -> Path:
    value = os.environ.get(var)
    if not value:
        raise SystemExit(f"set {var} to the llama.cpp folder holding {must_hold} (see bench/README.md)")
    folder = Path(value).expanduser()
    if not (folder / must_hold).exists():
        raise SystemExit(f"{var}={folder} has no {must_hold}; build llama.cpp's tools as bench/README.md says")
    return folder


def tool(name: str) -> Path:
    """Path of a built llama.cpp binary, e.g. tool("llama-quantize")."""
    return _folder("LLAMA_CPP_BIN", name) / name


def convert_command(model: Path, out: Path, outtype: str = "f16") -> tuple[list[str], dict]:
    """(argv, env) that runs llama.cpp's convert_hf_to_gguf.py with its own gguf-py first on the path."""
    src = _folder("LLAMA_CPP_SRC", "convert_hf_to_gguf.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src / "gguf-py"), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype, "--outfile", str(out)]
    return argv, env


def quantize_command(src: Path, dst: Path, ftype: str, imatrix: Path | None = None, threads: int | None = None) -> list[str]:
    argv = [str(tool("llama-quantize"))]
    if imatrix:
        argv += ["--imatrix", str(imatrix)]
    argv += [str(src), str(dst), ftype]
    return argv + ([str(threads)] if threads else [])


def imatrix_command(model: Path, text: Path, out: Path, ctx: int, chunks: int, threads: int) -> list[str]:
    return [str(tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(out),
            "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads), "--no-ppl"]


def llamacpp_files(model: Path, work: Path, types: list[str], calibration: Path | None, calib_tokens: int,
                   threads: int) -> dict[str, Path]:
    """llama.cpp's own pipeline: convert_hf_to_gguf.py --outtype f16, [llama-imatrix on `calibration`,]
    llama-quantize per type. Returns {"F16": ..., TYPE: ..., "TYPE+imatrix": ...}."""
    f16 = work / "llamacpp-F16.gguf"
    argv, env = convert_command(model, f16, "f16")
    timed_process(argv, env, work / "convert.log")
    files = {"F16": f16}
    imatrix = None
    if calibration:
        imatrix = work / "imatrix.gguf"
        timed_process(imatrix_command(f16, calibration, imatrix, 512, max(1, calib_tokens // 512), threads), log=work / "imatrix.log")
    for t in types:
        if t == "F16":
            continue
        out = work / f"llamacpp-{t}.gguf"
        timed_process(quantize_command(f16, out, t, threads=threads), log=work / f"quantize-{t}.log")
        files[t] = out
        if imatrix:
            out = work / f"llamacpp-{t}-imatrix.gguf"
            timed_process(quantize_command(f16, out, t, imatrix, threads), log=work / f"quantize-{t}-imatrix.log")
            files[f"{t}+imatrix"] = out
    return files


def genai_builder_command(model: Path, out: Path, cache: Path, precision: str = "int4") -> list[str]:
    """onnxruntime-genai's model builder for CPU (RTN int4 in blocks of 32 by default)."""
    return [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out), "-p", precision,
            "-e", "cpu", "-c", str(cache)]
