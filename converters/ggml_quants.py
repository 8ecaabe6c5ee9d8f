"""ggml's own quantizers, called directly: quantize a weight to a GGUF type and back, in memory.

The planner needs the exact error llama.cpp's quantizer will make (importance matrix included)
without writing files, so it calls `ggml_quantize_chunk` and the type's `to_float` from the
libggml that llama-cpp-python ships.
"""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import gguf
import numpy as np

from edgeq.errors import EdgeqError

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", _TO_FLOAT), ("from_float_ref", ctypes.c_void_p),
    ]


@cache
def _ggml() -> ctypes.CDLL:
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) or sorted(lib_dir.glob("libggml.*"))
    if not candidates:
        raise EdgeqError(f"libggml not found in {lib_dir}; reinstall llama-cpp-python")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def block_size(type_name: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def fits(type_name: str, shape: tuple[int, ...]) -> bool:
    """Whether rows of this width can be stored in the type (K-quants need multiples of 256)."""
    return shape[-1] % block_size(type_name) == 0


def tensor_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * (shape[-1] // block) * size


def round_trip(weight: np.ndarray, type_name: str, importance: np.ndarray | None = None, threads: int = 2) -> np.ndarray:
    """`weight` (rows × cols, float32) quantized to `type_name` by ggml and dequantized again."""
    qtype = int(gguf.GGMLQuantizationType[type_name])
    if type_name in ("F32",):
        return weight.astype(np.float32, copy=True)
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    rows, cols = weight.shape
    if not fits(type_name, weight.shape):
        raise EdgeqError(f"rows of width {cols} cannot be stored as {type_name} (block {block_size(type_name)})")
    lib = _ggml()
    traits = lib.ggml_get_type_traits(qtype).contents
    row_bytes = tensor_bytes(type_name, (1, cols))
    packed = np.empty(rows * row_bytes, dtype=np.uint8)
    imatrix = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    out = np.empty_like(weight)

    def work(span):
        start, stop = span
        lib.ggml_quantize_chunk(qtype, weight[start:stop].ctypes.data, packed[start * row_bytes:].ctypes.data, 0,
                                stop - start, cols, None if imatrix is None else imatrix.ctypes.data)
        traits.to_float(packed[start * row_bytes:].ctypes.data, out[start:stop].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), (stop - start) * cols)

    step = max(1, -(-rows // threads))
    spans = [(s, min(s + step, rows)) for s in range(0, rows, step)]
    with ThreadPoolExecutor(len(spans)) as pool:  # ctypes releases the GIL: rows quantize in parallel
        list(pool.map(work, spans))
    return out
