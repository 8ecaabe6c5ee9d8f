"""ONNX's weight blocks: symmetric block-wise codes as MatMulNBits and GatherBlockQuantized pack them.

Quantization is symmetric (`edgeq.quant.grid`), as onnxruntime's kernels expect when no zero points are
given (zero point 2^(bits-1)). `BlockGrid` is that grid with MatMulNBits' packing, for GPTQ
(`edgeq.quant.gptq`), which exports use by default; `quantize_blocks` alone is `rounding="nearest"`. Torch and
numpy only, so the format's spec prices and round-trips blocks without importing onnx.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from edgeq.quant.grid import SymmetricGrid, search


@dataclass(frozen=True)
class Quantized:
    data: np.ndarray    # uint8 codes: (rows, blocks, block*bits/8) for MatMulNBits, (rows, cols*bits/8) for GatherBlockQuantized
    scales: np.ndarray  # float32 or float16 (rows, blocks): MatMulNBits multiplies in its scales' dtype
    bits: int
    block_size: int


def _padded_blocks(weight: torch.Tensor, importance: np.ndarray | None, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, blocks, block) weight and (1, blocks, block) column importance (mean 1), zero in the padding."""
    rows, cols = weight.shape
    n_blocks = math.ceil(cols / block_size)
    w = torch.zeros(rows, n_blocks * block_size, dtype=torch.float32)
    w[:, :cols] = weight.float()
    imp = torch.ones(n_blocks * block_size)
    if importance is not None:
        imp[:cols] = torch.as_tensor(importance, dtype=torch.float32).clamp_min(1e-12)
        imp[:cols] /= imp[:cols].mean()
    imp[cols:] = 0
    return w.view(rows, n_blocks, block_size), imp.view(1, n_blocks, block_size)


def _pack(q: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int, half: bool) -> Quantized:
    codes = (q + 2 ** (bits - 1)).to(torch.uint8).numpy()
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return Quantized(np.ascontiguousarray(codes), scales.reshape(q.shape[0], -1).numpy().astype(np.float16 if half else np.float32),
                     bits, block_size)


def quantize_blocks(weight: torch.Tensor, bits: int, block_size: int, importance: np.ndarray | None = None,
                    half: bool = False) -> Quantized:
    """Symmetric block-wise quantization of a (rows, cols) weight along its columns (the input dimension); `half`
    stores float16 scales, and the codes are rounded at them."""
    w, imp = _padded_blocks(weight, importance, block_size)
    q, scales = search(w, imp, bits)
    if half:
        scales = scales.half().float()
        q = (w / torch.where(scales == 0, torch.ones_like(scales), scales)).round_().clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return _pack(q, scales, bits, block_size, half)


@dataclass(frozen=True)
class BlockGrid(SymmetricGrid):
    """ONNX's encoding of what GPTQ rounded on the grid (`edgeq.quant.grid`): MatMulNBits' packed codes and float32 scales."""

    def encode(self, rounded: torch.Tensor, scales: torch.Tensor) -> Quantized:
        rows, cols = rounded.shape
        blocks = rounded.view(rows, cols // self.block, self.block)
        scales = scales.view(rows, -1, 1)
        return _pack(self.codes(blocks, scales), scales, self.bits, self.block, self.scale_dtype == torch.float16)


@dataclass(frozen=True)
class HalfBlockGrid(BlockGrid):
    """The same blocks with float16 scales (MatMulNBits on float16 activations), as GGUF's Q4_0/Q8_0 store theirs: at
    4 bits, blocks of 32 for the bytes float32 scales take at 64. The kernel multiplies code × scale in float32."""

    scale_dtype: ClassVar[torch.dtype] = torch.float16

    def round(self, column: torch.Tensor, scale: torch.Tensor, index: int) -> torch.Tensor:
        return self.codes(column, scale) * scale


def dequantize(q: Quantized, cols: int) -> np.ndarray:
    """The float weight a Quantized stands for (tests check onnxruntime reads our packing as this)."""
    codes = q.data
    if q.bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
    rows = codes.shape[0]
    codes = codes.reshape(rows, q.scales.shape[1], q.block_size).astype(np.float32) - 2 ** (q.bits - 1)
    return (codes * q.scales[..., None]).reshape(rows, -1)[:, :cols]
