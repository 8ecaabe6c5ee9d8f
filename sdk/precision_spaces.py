"""What each format can store per tensor: candidate precisions, their bytes, and their round trip.

A precision space is the planner's view of a format. GGUF uses ggml's own quantizers (so the
predicted error is the error llama.cpp will make); ONNX and Core ML use the block-wise and
per-channel integer schemes their converters write.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class PrecisionSpace(Protocol):
    format: str

    def candidates(self, shape: tuple[int, ...]) -> list[str]:
        """Precisions this tensor can take, smallest first."""

    def nbytes(self, precision: str, shape: tuple[int, ...]) -> int: ...

    def round_trip(self, weight: np.ndarray, precision: str, importance: np.ndarray | None) -> np.ndarray:
        """The weight as the format will hold it (quantized, then dequantized), float32."""


class GGUFSpace:
    """Types every llama.cpp CPU backend runs well. K-quants only where rows are a multiple of 256."""

    format = "gguf"
    types = ("Q4_0", "IQ4_NL", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0", "F16")

    def candidates(self, shape):
        from edgeq.converters.ggml_quants import fits, tensor_bytes

        usable = [t for t in self.types if fits(t, shape)]
        return sorted(usable, key=lambda t: (tensor_bytes(t, shape), self.types.index(t)))

    def nbytes(self, precision, shape):
        from edgeq.converters.ggml_quants import tensor_bytes

        return tensor_bytes(precision, shape)

    def round_trip(self, weight, precision, importance):
        from edgeq.converters.ggml_quants import round_trip

        return round_trip(weight, precision, importance)


def _int_blockwise(weight: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Asymmetric min/max integer quantization per block of `block` columns (MatMulNBits, Core ML per-block)."""
    rows, cols = weight.shape
    w = weight.reshape(rows, cols // block, block)
    lo, hi = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
    scale = np.maximum(hi - lo, 1e-12) / (2**bits - 1)
    q = np.clip(np.round((w - lo) / scale), 0, 2**bits - 1)
    return (q * scale + lo).reshape(rows, cols).astype(np.float32)


def _int8_per_channel(weight: np.ndarray) -> np.ndarray:
    scale = np.maximum(np.abs(weight).max(-1, keepdims=True), 1e-12) / 127.0
    return (np.clip(np.round(weight / scale), -127, 127) * scale).astype(np.float32)


class IntegerSpace:
    """int4 block-wise (with fp16 scale and zero point per block), int8 per channel, fp16."""

    def __init__(self, format: str, block: int = 32):
        self.format = format
        self.block = block

    def candidates(self, shape):
        usable = ["int4"] if shape[-1] % self.block == 0 else []
        return usable + ["int8", "fp16"]

    def nbytes(self, precision, shape):
        n = int(np.prod(shape))
        if precision == "int4":
            return n // 2 + (n // self.block) * 4
        return {"int8": n + shape[0] * 4, "fp16": 2 * n, "fp32": 4 * n}[precision]

    def round_trip(self, weight, precision, importance):
        if precision == "int4":
            return _int_blockwise(weight, 4, self.block)
        if precision == "int8":
            return _int8_per_channel(weight)
        return weight.astype(np.float16).astype(np.float32)


class ONNXSpace(IntegerSpace):
    """What the ONNX converter writes: symmetric blocks of 32 with float32 scales for int4 (MatMulNBits)
    and for int8 alike, rounded by the converter's own importance-weighted scale search."""

    def __init__(self):
        super().__init__("onnx", block=32)

    def nbytes(self, precision, shape):
        n = int(np.prod(shape))
        if precision in ("int4", "int8"):
            bits = int(precision[3:])
            return n * bits // 8 + -(-shape[-1] // self.block) * shape[0] * 4
        return super().nbytes(precision, shape)

    def round_trip(self, weight, precision, importance):
        if precision not in ("int4", "int8"):
            return super().round_trip(weight, precision, importance)
        import torch

        from edgeq.converters.onnx_weights import dequantize, quantize_blocks

        q = quantize_blocks(torch.from_numpy(np.ascontiguousarray(weight)), int(precision[3:]), self.block, importance)
        return dequantize(q, weight.shape[1])


def precision_space(format: str) -> PrecisionSpace:
    if format == "gguf":
        return GGUFSpace()
    return ONNXSpace() if format == "onnx" else IntegerSpace(format)
