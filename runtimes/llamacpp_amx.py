"""Whether llama.cpp's AMX kernels can run on this machine, found out once, in a child process.

llama-cpp-python built from source with its default native flags compiles llama.cpp's Intel AMX kernels
when the build machine's CPU advertises AMX, and llama.cpp then moves quantized weights into its AMX buffers.
Some virtual machines advertise AMX (`amx_tile` in /proc/cpuinfo; the kernel grants the permission) yet fault
on the first tile instruction: every decode of a quantized GGUF then dies with SIGSEGV, llama.cpp's own
llama-bench included. So on a CPU that advertises AMX, the first quantized model loaded decodes a few tokens
in a child process; if the child dies by a signal, llama.cpp is told not to use its extra buffer types (AMX
and the CPU repacked layouts) on this machine, and the verdict is cached per CPU, kernel and llama.cpp build.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

# ggml types llama.cpp's AMX kernels take (ggml-cpu/amx/common.h, qtype_has_amx_kernels)
AMX_TYPES = {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}
VERDICTS = "llama-cpp-amx.json"

_PROBE = """
import sys, llama_cpp
llama_cpp.llama_backend_init()
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), llama_cpp.llama_model_default_params())
if not model:
    sys.exit(2)
params = llama_cpp.llama_context_default_params()
params.n_ctx = params.n_batch = params.n_ubatch = 64
params.n_threads = params.n_threads_batch = 2
ctx = llama_cpp.llama_init_from_model(model, params)
vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
batch = llama_cpp.llama_batch_init(32, 0, 1)
for i in range(32):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = i % vocab, i, 1, i == 31
    batch.seq_id[i][0] = 0
batch.n_tokens = 32
sys.exit(0 if llama_cpp.llama_decode(ctx, batch) == 0 else 2)
"""


@cache
def amx_advertised() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def extra_buffers_usable(model_path: Path) -> bool:
    """False when llama.cpp must run this model without its extra buffer types: the CPU advertises AMX, the model
    has weights AMX would take, and a decode with them died by a signal (here, or once before on this machine)."""
    if not amx_advertised():
        return True
    from edgeq.converters.gguf.ggml_quants import tensor_table
    from edgeq.errors import EdgeqError

    try:
        if not {t.type_name for t in tensor_table(model_path)} & AMX_TYPES:
            return True
    except EdgeqError:  # not a readable GGUF: the loader says so
        return True
    return _amx_runs(str(model_path))


@cache
def _amx_runs(model_path: str) -> bool:
    verdicts_file = _verdicts_file()
    key = _machine_key()
    try:
        verdicts = json.loads(verdicts_file.read_text())
    except (OSError, ValueError):
        verdicts = {}
    if isinstance(verdicts, dict) and isinstance(verdicts.get(key), bool):
        return verdicts[key]
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, model_path], capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:  # a machine too loaded to answer: nothing learnt, llama.cpp's defaults stand
        return True
    if done.returncode > 0:  # the child could not load or decode for another reason: nothing learnt
        return True
    works = done.returncode == 0
    if not works:
        log.warning("llama.cpp's AMX kernels crash on this CPU (it advertises AMX but faults on it, as some virtual "
                    "machines do); llama.cpp runs here without its AMX and repacked weight layouts")
    verdicts = verdicts if isinstance(verdicts, dict) else {}
    verdicts[key] = works
    verdicts_file.parent.mkdir(parents=True, exist_ok=True)
    staged = verdicts_file.with_suffix(f".{os.getpid()}.tmp")  # processes probing at once each stage their own file
    staged.write_text(json.dumps(verdicts, indent=1))
    staged.replace(verdicts_file)
    return works


def _verdicts_file() -> Path:
    from edgeq.default_model import cache_dir

    return cache_dir() / VERDICTS


def _machine_key() -> str:
    import llama_cpp

    model_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")), "?")
    library = Path(llama_cpp.__file__).parent / "lib"
    built = max((p.stat().st_mtime_ns for p in library.glob("libggml-cpu*")), default=0)
    return f"{model_name} | {platform.release()} | llama-cpp-python {llama_cpp.__version__} built {built}"
