"""What each format can store per tensor: candidate precisions, their bytes, and their round trip.

A precision space is the planner's view of a format. GGUF uses ggml's own quantizers (so the
predicted error is the error llama.cpp will make); ONNX and Core ML use the block-wise and
per-channel integer schemes their converters write, computed as those converters compute them.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from edgeq.converters.coreml_package import INT4_BLOCKS

from .errors import EdgeqError


class PrecisionSpace(Protocol):
    format: str
    float_bytes: int  # per element of the tensors that are never quantized (norms, biases)

    def candidates(self, shape: tuple[int, ...]) -> list[str]:
        """Precisions this tensor can take, smallest first."""

    def nbytes(self, precision: str, shape: tuple[int, ...]) -> int: ...

    def round_trip(self, weight: np.ndarray, precision: str, importance: np.ndarray | None) -> np.ndarray:
        """The weight as the format will hold it (quantized, then dequantized), float32."""


class GGUFSpace:
    """Types every llama.cpp CPU backend runs well. K-quants only where rows are a multiple of 256."""

    format = "gguf"
    float_bytes = 4
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


class ONNXSpace:
    """What the ONNX converter writes: symmetric blocks with float32 scales, int4 in the converter's default
    block (64 where it divides the width, see `int4_block`) and int8 in blocks of 32 (MatMulNBits), rounded
    by the converter's importance-weighted scale search; or fp16. (An export rounds by GPTQ on top, which
    only lowers the error priced here.)"""

    format = "onnx"
    float_bytes = 4

    @staticmethod
    def _block(precision: str, shape) -> int | None:
        from edgeq.converters.onnx_weights import int4_block

        return int4_block(shape[-1]) if precision == "int4" else 32

    def candidates(self, shape):
        usable = ["int4"] if self._block("int4", shape) else []
        return usable + ["int8", "fp16"]

    def nbytes(self, precision, shape):
        n = int(np.prod(shape))
        if precision == "fp16":
            return 2 * n
        return n * int(precision[3:]) // 8 + -(-shape[-1] // self._block(precision, shape)) * shape[0] * 4

    def round_trip(self, weight, precision, importance):
        if precision == "fp16":
            return _fp16(weight)
        import torch

        from edgeq.converters.onnx_weights import dequantize, quantize_blocks

        block = self._block(precision, weight.shape)
        q = quantize_blocks(torch.from_numpy(np.ascontiguousarray(weight)), int(precision[3:]), block, importance)
        return dequantize(q, weight.shape[1])


class CoreMLSpace:
    """What coremltools.optimize writes for the Core ML converter, on the float16 weights the converted
    program holds: int4 asymmetric in blocks of 16/32/64/128 inputs (int4 data, an fp16 scale and an
    int4 zero point per block; the range always contains 0), int8 symmetric per output channel (fp16
    scale per row, -127..127), fp16. coremltools' linear quantizer takes no importance matrix, so
    neither does this round trip. Tensors never quantized (norms) stay float16."""

    format = "coreml"
    float_bytes = 2

    def candidates(self, shape):
        usable = [p for p, block in INT4_BLOCKS.items() if shape[-1] % block == 0] + ["int8", "fp16"]
        return sorted(usable, key=lambda p: self.nbytes(p, shape))

    def nbytes(self, precision, shape):
        n = int(np.prod(shape))
        if precision in INT4_BLOCKS:
            blocks = n // INT4_BLOCKS[precision]
            return n // 2 + 2 * blocks + -(-blocks // 2)
        return {"int8": n + 2 * shape[0], "fp16": 2 * n}[precision]

    def round_trip(self, weight, precision, importance):
        # In float16 arithmetic, as coremltools does it on the program's float16 constants: a rounding
        # tie decided in float32 instead would land a whole step away.
        w = weight.astype(np.float16)
        if precision in INT4_BLOCKS:
            rows, cols = w.shape
            blocks = w.reshape(rows, -1, INT4_BLOCKS[precision])
            lo = np.minimum(blocks.min(-1, keepdims=True), 0)
            hi = np.maximum(blocks.max(-1, keepdims=True), 0)
            with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block: scale 0, stays 0
                scale = (hi - lo) / 15
                zero = np.nan_to_num(np.clip(np.round((-8 * hi - 7 * lo) / (hi - lo)), -8, 7))
                q = np.clip(np.nan_to_num(np.round(blocks / scale)) + zero, -8, 7)
            dense = (q.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)
            return _fp16(dense.reshape(rows, cols))
        if precision == "int8":
            scale = np.abs(w).max(-1, keepdims=True) / 127
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.clip(np.nan_to_num(np.round(w / scale)), -127, 127)
            return _fp16(q.astype(np.float32) * scale.astype(np.float32))
        return w.astype(np.float32)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def precision_space(format: str) -> PrecisionSpace:
    if format == "gguf":
        return GGUFSpace()
    if format == "onnx":
        return ONNXSpace()
    if format == "coreml":
        return CoreMLSpace()
    raise EdgeqError(f"edgeq has no precision plan for format {format!r}; plan for gguf, onnx or coreml")
