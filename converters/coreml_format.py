"""Core ML's facts for the rest of edgeq: precisions, nominal sizes, the planner's space. Imports no coremltools."""
from __future__ import annotations

import sys

import numpy as np

from edgeq.formats import FormatSpec

# int4 precisions by block size along the input dimension; the package reader names each back by this name.
INT4_BLOCKS = {"int4": 32, "int4-block16": 16, "int4-block64": 64, "int4-block128": 128}
PRECISIONS = ("fp16", "int8", *INT4_BLOCKS, "palettize4", "palettize6")
# the precisions edgeq quantizes itself → inputs per scale (0: the whole row: int8 has one scale per output channel)
LINEAR_BLOCKS = {"int8": 0, **INT4_BLOCKS}
SLICE_ELEMENTS = 1 << 20  # weights are quantized this many elements at a time


def int4_bits(block: int) -> float:
    """int4 data, an fp16 scale and an int4 zero point per block."""
    return 4 + (16 + 4) / block


class CoreMLSpace:
    """What the Core ML converter writes (`linear_codes`: coremltools.optimize's values), on the float16 weights
    the converted program holds: int4 asymmetric in blocks of 16/32/64/128 inputs (int4 data, an fp16 scale and an
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
        if precision not in LINEAR_BLOCKS:
            return w.astype(np.float32)
        return dequantize(*linear_codes(w, precision))


def linear_codes(weight: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(int8 codes, scales, int8 zero points or None) of a 2-D weight at a linear precision, bit for bit what
    coremltools' quantizer (`optimize._utils.compute_qparams_by_dtype`) writes for it, scales in the weight's dtype.

    coremltools computes in numpy in the weight's dtype, and numpy does a float16 op in float32 and rounds the
    result to float16. These are the same ops in float32, each rounded to the weight's dtype, in torch, whose
    float16 casts are vectorised where numpy's convert element by element (a few seconds at 1.5B parameters,
    not minutes), a slice of rows at a time so the temporaries stay a few MiB whatever the weight."""
    import torch

    rows, cols = weight.shape
    block = LINEAR_BLOCKS[precision] or cols
    source = torch.from_numpy(weight)
    codes = torch.empty(rows, cols, dtype=torch.int8)
    scales = torch.empty(rows, cols // block, dtype=source.dtype)
    zeros = None if precision == "int8" else torch.empty(rows, cols // block, dtype=torch.int8)
    quantize = _symmetric if zeros is None else _asymmetric
    step = max(1, SLICE_ELEMENTS // cols)
    for start in range(0, rows, step):
        part = slice(start, start + step)
        q, scale, zero = quantize(source[part].float().view(-1, cols // block, block), _rounding(source.dtype))
        codes[part], scales[part] = q.view(-1, cols), scale
        if zeros is not None:
            zeros[part] = zero
    return codes.numpy(), scales.numpy(), None if zeros is None else zeros.numpy()


def _rounding(dtype):
    """Rounds float32 values to `dtype`, kept as float32: what numpy does after each float16 op."""
    return lambda x: x.to(dtype).float()


def _symmetric(blocks, exact):
    """int8 codes -127..127 and each block's (a whole row's) scale, (max - -max) / 254 as coremltools spells it."""
    peak = blocks.abs().amax(-1)
    scale = exact(exact(peak + peak) / 254)
    return _int8(exact(blocks / scale[..., None]).round().clamp(-127, 127)), scale, None


def _asymmetric(blocks, exact):
    """int4 codes and zero points -8..7 and each block's scale; the block's range always holds 0."""
    lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
    span = exact(hi - lo)
    zero = exact(exact(exact(-8 * hi) - exact(7 * lo)) / span).round().clamp(-8, 7)
    scale = exact(span / 15)
    q = (exact(blocks / scale[..., None]).round() + zero[..., None]).clamp(-8, 7)
    return _int8(q), scale, _int8(zero)


def _int8(x):
    """Integral float32 values as int8. An all-zero block (scale 0, codes 0/0) gets codes 0, what coremltools' cast
    of that NaN gives on x86; its dense value is 0 whatever the codes."""
    return x.nan_to_num_(0.0).char()


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None) -> np.ndarray:
    """The float32 weight `constexpr_blockwise_shift_scale` computes from `linear_codes`: scale × (code - zero), in
    the scales' dtype."""
    rows, cols = codes.shape
    blocks = codes.reshape(rows, scales.shape[1], -1).astype(np.float32)
    if zeros is not None:
        blocks -= zeros[..., None]
    return (blocks * scales[..., None].astype(np.float32)).astype(scales.dtype).astype(np.float32).reshape(rows, cols)


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
