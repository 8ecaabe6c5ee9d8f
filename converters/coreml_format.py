"""Core ML's facts for the rest of edgeq: precisions, nominal sizes, the planner's space. Imports no coremltools."""
from __future__ import annotations

import sys

import numpy as np

from edgeq.formats import FormatSpec

# int4 precisions by block size along the input dimension; the package reader names each back by this name.
INT4_BLOCKS = {"int4": 32, "int4-block16": 16, "int4-block64": 64, "int4-block128": 128}
PRECISIONS = ("fp16", "int8", *INT4_BLOCKS, "palettize4", "palettize6")


def int4_bits(block: int) -> float:
    """int4 data, an fp16 scale and an int4 zero point per block."""
    return 4 + (16 + 4) / block


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


class CoreMLFormat(FormatSpec):
    name = "coreml"
    runtime = "coreml"
    converter_target = "edgeq.converters.coreml:CoreMLConverter"
    precisions = PRECISIONS
    default_precision = "int4"
    float_precision = "fp16"  # the package computes in float16
    planned_precision = "int4"  # the base of a planned export; the plan names every weight
    nominal_bpw = {"int4": 5.0, **{p: int4_bits(b) for p, b in INT4_BLOCKS.items() if p != "int4"},
                   "int8": 8.0, "palettize4": 4.0, "palettize6": 6.0, "fp16": 16.0}
    kv_element_bytes = 2  # the package's key/value state is float16
    kept_adapters = "functions prefill_NAME / decode_NAME of the multifunction package, over the base's shared weights"
    export_bytes_per_weight = 10  # a traced float32 decoder plus coremltools' float16 copy

    @property
    def eval_runtime(self) -> str:
        """Core ML predicts on Apple platforms only; elsewhere quality is measured on the package's weights in torch."""
        return "coreml" if sys.platform == "darwin" else "coreml-torch"

    def file_overhead(self, source, tensors):
        # the program spec of two functions names every weight op twice; weights align to 64 bytes
        return tensors * (2 * 1024 + 64) + (256 << 10)

    def space(self):
        return CoreMLSpace()


COREML = CoreMLFormat()
