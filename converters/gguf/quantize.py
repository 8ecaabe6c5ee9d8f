"""llama.cpp's quantizer through llama-cpp-python, and a read-back of what it really wrote.

llama.cpp may quietly choose another type than asked (a K-quant on a row width not divisible by
256 falls back to a legacy type; an override pattern that matches nothing does nothing), so the
written file is read back and every difference is reported.
"""
from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import gguf
import numpy as np

from edgeq.errors import EdgeqError
from edgeq.formats import readback
from edgeq.progress import bar

from . import spec as gguf_format

FLOAT_TYPES = {name: gguf.LlamaFileType["ALL_F32" if name == "F32" else f"MOSTLY_{name}"] for name in gguf_format.FLOAT_TYPES}
QUANT_TYPES = {name: gguf.LlamaFileType[f"MOSTLY_{name}"] for name in gguf_format.QUANT_TYPES}
_K_TYPES = {t for t in gguf.GGMLQuantizationType if t.name.endswith("_K")}
_QUANT_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")


def ggml_type(name: str) -> gguf.GGMLQuantizationType:
    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise EdgeqError(f"unknown GGUF tensor type {name!r}; use one of Q8_0, Q6_K, Q5_K, Q4_K, Q4_0, F16, …") from None


def _imatrix_array(importance: dict[str, np.ndarray]):
    import llama_cpp

    keep = {name: np.ascontiguousarray(values, dtype=np.float32) for name, values in importance.items()}
    entries = (llama_cpp.llama_model_imatrix_data * (len(keep) + 1))()
    for entry, (name, values) in zip(entries, keep.items()):
        entry.name = name.encode()
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = values.size
    return entries, keep  # `keep` must outlive the quantize call


def _override_array(overrides: dict[str, str]):
    import llama_cpp

    entries = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for entry, (tensor, type_name) in zip(entries, overrides.items()):
        entry.pattern = f"^{re.escape(tensor)}$".encode()
        entry.type = int(ggml_type(type_name))
    return entries


def quantize(src: Path, dst: Path, precision: str, *, overrides: dict[str, str] | None = None,
             importance: dict[str, np.ndarray] | None = None, progress: bool | None = None) -> None:
    """Runs llama_model_quantize; `overrides` maps exact GGUF tensor names to ggml type names."""
    import llama_cpp

    from edgeq.converters.gguf.native import llama_log_lines

    base = FLOAT_TYPES.get(precision) or QUANT_TYPES[precision]
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = os.cpu_count() or 1
    params.ftype = int(base)
    keep = []
    if importance:
        entries, arrays = _imatrix_array(importance)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep += [entries, arrays]
    if overrides:
        entries = _override_array(overrides)
        params.tt_overrides = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(entries)

    with bar(total=None, desc=f"quantize {precision}", unit="tensor", progress=progress) as pbar:
        def on_line(line: str) -> None:
            if m := _QUANT_LINE.search(line):
                pbar.total = int(m[2])
                pbar.n = int(m[1])
                pbar.refresh()

        with llama_log_lines(on_line):
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if status != 0:
        raise EdgeqError(f"llama.cpp could not quantize to {precision} (status {status}); run with --debug to see its log")


def read_tensor_types(path: Path, precision: str, overrides: dict[str, str] | None = None) -> dict:
    """Tensor types as written, real bits per weight, and every place the file differs from the request."""
    from .ggml_quants import tensor_table

    tensors, mismatches = {}, []
    k_mix = precision.startswith("Q") and "_K" in precision
    for t in tensor_table(path):
        got = gguf.GGMLQuantizationType[t.type_name]
        shape = list(t.shape)
        tensors[t.name] = {"type": got.name, "shape": shape, "bytes": t.nbytes}
        asked = (overrides or {}).get(t.name)
        if asked and ggml_type(asked) != got:
            mismatches.append({"tensor": t.name, "asked": asked.upper(), "got": got.name, "why": f"row width {shape[-1]}"})
        elif not asked and k_mix and len(shape) == 2 and got not in _K_TYPES and got != gguf.GGMLQuantizationType.F32:
            mismatches.append({"tensor": t.name, "asked": precision, "got": got.name,
                               "why": f"row width {shape[-1]} is not a multiple of 256, so llama.cpp fell back"})
    return readback(tensors, mismatches)
