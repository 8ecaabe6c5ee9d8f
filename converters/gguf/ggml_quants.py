"""ggml's own C library, called directly: its quantizers, and its reader of a GGUF file's tensor table.

The planner needs the exact error llama.cpp's quantizer will make (importance matrix included)
without writing files, so it calls `ggml_quantize_chunk` and the type's `to_float` from the
libggml that llama-cpp-python ships. The export's read-back reads the written file with the parser
llama.cpp itself loads it with, in C (gguf-py's reader walks every vocabulary string in Python: seconds a file).
"""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


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
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_data_offset.restype = ctypes.c_size_t
    lib.gguf_get_data_offset.argtypes = [ctypes.c_void_p]
    for name, restype in (("name", ctypes.c_char_p), ("ne", ctypes.POINTER(ctypes.c_int64)), ("type", ctypes.c_int),
                          ("size", ctypes.c_size_t), ("offset", ctypes.c_size_t)):
        function = getattr(lib, f"gguf_get_tensor_{name}")
        function.restype, function.argtypes = restype, [ctypes.c_void_p, ctypes.c_int64]
    return lib


@dataclass(frozen=True)
class TensorEntry:
    name: str
    type_name: str
    shape: tuple[int, ...]   # rows first, as torch orders it (ggml's ne reversed)
    nbytes: int
    offset: int              # where its data starts in the file


def tensor_table(path: Path) -> list[TensorEntry]:
    """Every tensor a GGUF file declares, as ggml parses it (metadata only; no tensor data is read), with where its
    data lies in the file (`convert` writes GPTQ's blocks there in place of the quantizer's). A ggml shape
    has four dimensions padded with ones; trailing ones are dropped, which no decoder tensor (1-D norms, 2-D
    matrices with more than one row) is changed by."""
    lib = _ggml()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(no_alloc=True, ctx=None))
    if not ctx:
        raise EdgeqError(f"{path} is not a GGUF file llama.cpp can read; export it again")
    try:
        entries, data = [], lib.gguf_get_data_offset(ctx)
        for i in range(lib.gguf_get_n_tensors(ctx)):
            ne = lib.gguf_get_tensor_ne(ctx, i)[:4]
            while len(ne) > 1 and ne[-1] == 1:
                ne.pop()
            entries.append(TensorEntry(lib.gguf_get_tensor_name(ctx, i).decode(),
                                       gguf.GGMLQuantizationType(lib.gguf_get_tensor_type(ctx, i)).name,
                                       tuple(reversed(ne)), lib.gguf_get_tensor_size(ctx, i), data + lib.gguf_get_tensor_offset(ctx, i)))
        return entries
    finally:
        lib.gguf_free(ctx)


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
