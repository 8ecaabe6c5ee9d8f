"""edgeq's rounding in the layouts ExecuTorch lowers: torchao's grouped int4 / per-channel int8 linear weights (XNNPACK's
qd8 kernels) and ExecuTorch's quantized embedding lookups.

torchao's own `quantize_` rounds each group to its absmax, nearest; edgeq writes its own codes and scales into the
same tensor subclass (`IntxUnpackedToInt8Tensor`, what `Int8DynamicActivationIntxWeightConfig` makes), so the lowering
is the one torchao's configs get, with the levels of `edgeq.quant.grid.search` (importance-weighted scale search) or of
GPTQ (`edgeq.quant.gptq`) on the same grid. Group scales are rounded to bfloat16 before codes are chosen: XNNPACK
stores blockwise scales as bfloat16, so the levels rounded to are the levels the delegate computes with.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeq.quant.grid import SymmetricGrid, search

from .layouts import LINEARS, Linear

GPTQ_BLOCK = 32  # columns GPTQ rounds together at one per-channel int8 scale (the scale itself is the row's)


def scale_dtype(linear: Linear) -> torch.dtype:
    return torch.bfloat16 if linear.group else torch.float32


def nearest_codes(weight: torch.Tensor, linear: Linear, importance: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (rows, cols), scales (rows, groups)) of least importance-weighted squared error per group."""
    w = weight.detach().float()
    rows, cols = w.shape
    group = linear.group or cols
    imp = torch.ones(1, 1, group) if importance is None else _importance(importance, cols, group)
    scales = positive_scales(w.view(rows, -1, group), imp, linear.bits if linear.group else 0)
    scales = scales.to(scale_dtype(linear)).float()
    lo, hi = _range(linear)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    codes = (w.view(rows, -1, group) / safe).round_().clamp_(lo, hi)
    return codes.view(rows, cols).to(torch.int8), scales.view(rows, -1)


# Start divisors of the scale search by the sign of each group's largest weight: XNNPACK takes positive scales only, so
# a group whose extreme is negative may put it on the extra level -8, one whose extreme is positive tops out at +7.
# (bits 0: per-channel int8, symmetric -127..127.)
POSITIVE_STARTS = {4: ((-8.0, -7.5, -7.0), (7.0, 7.5)), 0: ((-127.0, -126.5), (127.0, 126.5))}


def positive_scales(w: torch.Tensor, imp: torch.Tensor, bits: int, refits: int = 1) -> torch.Tensor:
    """Scales (rows, groups, 1) of least importance-weighted error among positive ones: the search run from the starts of
    either sign, and each group taking the run whose scale came out positive (the one matching its extreme's sign)."""
    found = []
    for divisors in POSITIVE_STARTS[bits]:
        _, scale = search(w, imp, 8 if bits == 0 else bits, {8 if bits == 0 else bits: (torch.tensor(divisors), refits)})
        found.append(scale)
    negative_side, positive_side = found
    return torch.where(negative_side > 0, negative_side, positive_side.clamp_min(0))


def _range(linear: Linear) -> tuple[int, int]:
    """Code range: int4 groups use all 16 levels (their scale may be negative); per-channel int8 is -127..127 at a
    positive scale, as XNNPACK's qcint8 requires."""
    return (-(2 ** (linear.bits - 1)), 2 ** (linear.bits - 1) - 1) if linear.group else (-127, 127)


def _importance(importance, cols: int, group: int) -> torch.Tensor:
    imp = torch.as_tensor(np.asarray(importance, dtype=np.float32).reshape(-1))
    if imp.numel() != cols:
        raise ValueError(f"importance has {imp.numel()} columns, the weight {cols}")
    mean = imp.mean()
    imp = (imp / mean if mean > 0 else torch.ones_like(imp)).clamp_min(1e-6)
    return imp.view(1, cols // group, group)


def torchao_weight(codes: torch.Tensor, scales: torch.Tensor, linear: Linear):
    """The weight as torchao's `IntxUnpackedToInt8Tensor`: symmetric (zero points 0), int8 activations per token when
    the precision is dynamic. ExecuTorch's XNNPACK partitioner lowers it to a qd8 fully-connected node."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization)

    rows, cols = codes.shape
    block = (1, linear.group or cols)
    activations = IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN if linear.dynamic else None
    scales = scales.float().view(rows, cols // block[1])
    return IntxUnpackedToInt8Tensor(codes.to(torch.int8).contiguous(), scales, torch.zeros(scales.shape, dtype=torch.int8),
                                    getattr(torch, f"int{linear.bits}"), block, torch.float32, activations)


class GroupGrid(SymmetricGrid):
    """GPTQ's grid (`edgeq.quant.gptq.Grid`) for a grouped precision: each group's scale searched on the error-updated
    weights and rounded to bfloat16, as the delegate stores it."""

    scale_dtype = torch.bfloat16

    def scales(self, weights, importance):
        imp = importance.clamp_min(1e-12)
        scale = positive_scales(weights.unsqueeze(1), (imp / imp.mean()).view(1, 1, -1), self.bits, refits=2)
        return scale.view(-1).to(self.scale_dtype).float()

    def encode(self, rounded, scales):
        rows, cols = rounded.shape
        codes = self.codes(rounded.view(rows, -1, self.block), scales.view(rows, -1, 1)).view(rows, cols)
        return codes.to(torch.int8), scales.float()


@dataclass(frozen=True)
class ChannelGrid:
    """GPTQ's grid for a per-channel precision: one positive float32 scale per row (codes -127..127), searched once on
    the original row (a scale per output channel cannot follow the error GPTQ moves along it); GPTQ rounds `GPTQ_BLOCK`
    columns at a time at it."""

    bits: int
    row_scales: torch.Tensor  # (rows,)
    block: int = GPTQ_BLOCK

    def scales(self, weights, importance):
        return self.row_scales

    def round(self, column, scale, index):
        """Every column of a row shares its one scale, whatever its `index` in the block."""
        lo, hi = -(2 ** (self.bits - 1)) + 1, 2 ** (self.bits - 1) - 1
        return (column / torch.where(scale == 0, torch.ones_like(scale), scale)).round().clamp(lo, hi) * scale

    def affine(self, scales):
        bound = 2 ** (self.bits - 1) - 1
        return self.row_scales.view(-1, 1).expand(-1, scales.shape[1] * self.block), 0.0, -bound, bound

    def rescaled(self, scales, factors):
        return None  # one scale per row, fixed before GPTQ

    def encode(self, rounded, scales):
        safe = torch.where(self.row_scales == 0, torch.ones_like(self.row_scales), self.row_scales).view(-1, 1)
        lo, hi = -(2 ** (self.bits - 1)) + 1, 2 ** (self.bits - 1) - 1
        return (rounded / safe).round().clamp(lo, hi).to(torch.int8), self.row_scales.view(-1, 1).float()


def gptq_grid(weight: torch.Tensor, precision: str, importance: np.ndarray | None):
    """The grid GPTQ rounds `weight` (HF layout) on at `precision`, or None when its width does not fit the groups."""
    linear = LINEARS[precision]
    cols = weight.shape[1]
    if linear.group:
        return GroupGrid(linear.bits, linear.group) if cols % linear.group == 0 else None
    if cols % GPTQ_BLOCK:
        return None
    _, scales = nearest_codes(weight, linear, importance)
    return ChannelGrid(linear.bits, scales.view(-1))


class QuantizedEmbedding(nn.Module):
    """The token lookup on ExecuTorch's quantized embedding kernels: 4-bit codes in groups (`embedding_4bit`, two codes to
    a byte, each + 8, the even one in the high nibble, float16 scales: 4.5 bits a weight, as llama.cpp's Q4_0 table) or
    8-bit codes per row (`embedding_byte`, float32 scales); float32 out either way."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int):
        super().__init__()
        self.bits = bits
        if bits == 4:
            biased = codes.to(torch.int16) + 8
            codes = ((biased[:, 0::2] << 4) | biased[:, 1::2]).to(torch.uint8)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.to(torch.float16 if bits == 4 else torch.float32).contiguous())

    def forward(self, tokens):
        if self.bits == 4:
            return torch.ops.quantized_decomposed.embedding_4bit.dtype(self.codes, self.scales, None, -8, 7, tokens, dtype=torch.float32)
        return torch.ops.quantized_decomposed.embedding_byte(self.codes, self.scales, None, -128, 127, tokens)


def embedding_module(weight: torch.Tensor, precision: str, importance: np.ndarray | None) -> QuantizedEmbedding:
    """The embedding at a linear precision's weight grid (groups of 32 at 4 bits, a scale per row at 8); the lookup
    has no activations to quantize, so only the weight grid of the precision applies. 4-bit codes are rounded against
    the float16 scales the table stores."""
    linear = LINEARS[precision]
    grid = Linear(linear.bits, linear.group, False)
    codes, scales = nearest_codes(weight, grid, importance)
    if linear.bits == 4:
        rows, cols = weight.shape
        stored = scales.half().float()
        safe = torch.where(stored == 0, torch.ones_like(stored), stored).view(rows, -1, 1)
        lo, hi = _range(grid)
        codes = (weight.detach().float().view(rows, -1, linear.group) / safe).round_().clamp_(lo, hi).view(rows, cols).to(torch.int8)
        scales = stored
    return QuantizedEmbedding(codes, scales, linear.bits)
