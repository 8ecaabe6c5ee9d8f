"""llama.cpp's own tools, the anchor the GGUF benchmarks compare edgeq against.

They are located from two environment variables (see bench/README.md) and are never a
dependency of edgeq itself:
  LLAMA_CPP_BIN  folder with the built llama-quantize, llama-imatrix, llama-perplexity, llama-bench
  LLAMA_CPP_SRC  llama.cpp source folder holding convert_hf_to_gguf.py (and gguf-py/)
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TIME = Path("/usr/bin/time")


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


@dataclass
class Run:
    wall_s: float
    peak_rss_mib: float   # max resident set of the process (from wait4, so no sample is missed)


def run(argv: list[str], env: dict | None = None, log: Path | None = None) -> Run:
    """Runs a command under /usr/bin/time -v; fails loudly with the log tail if it fails."""
    log = log or Path(os.devnull)
    timing = log.with_suffix(".time") if log != Path(os.devnull) else Path(f"/tmp/anchors-{os.getpid()}.time")
    start = time.perf_counter()
    with open(log, "w") as out:
        status = subprocess.run([str(TIME), "-v", "-o", str(timing), *argv], env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    report = timing.read_text()
    if status != 0:
        tail = Path(log).read_text()[-2000:] if log != Path(os.devnull) else ""
        raise SystemExit(f"command failed ({status}): {' '.join(argv)}\n{tail}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)[1])
    return Run(wall_s=wall, peak_rss_mib=rss_kib / 1024)
