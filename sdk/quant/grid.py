"""Symmetric integer grids in blocks of input columns: the levels ONNX's MatMulNBits and Core ML's int4 store.

A block's levels are scale × -2^(b-1) .. 2^(b-1)-1. Its scale comes from a small search over candidate scales
with a least-squares refit (weighted by the calibration importance when there is one): plain absmax rounding
wastes part of the 16 levels. `SymmetricGrid` is the same grid for GPTQ (`edgeq.quant.gptq.Grid`); each format
subclasses it with `encode`, its stored form, and says in `scale_dtype` what its scales are stored as, so the
levels GPTQ rounds to are the stored ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

# Where each block's scale search starts (divisors of the block's signed absmax; -2^(b-1) puts the largest
# value on the one-sided extra level) and how often the scale is refit to the codes from each start.
# Nearest rounding is the quick path, and the planner's proxy: three starts and one refit, a few percent more
# weighted error than twenty starts and two refits at a sixth of the time (bench/README.md, ONNX export cost).
NEAREST = {4: (torch.tensor([-8.0, -7.0, 7.0]), 1), 8: (torch.tensor([-128.0, -127.0, 127.0]), 1)}
# GPTQ compensates rounding error itself, and rounds on scales searched once per block of a layer: five
# starts give it the KL of twenty.
GPTQ = {4: (torch.tensor([-8.0, -7.5, -7.0, 7.0, 7.5]), 2), 8: (torch.tensor([-128.0, -127.5, -127.0, 127.0, -128.5, -126.5]), 2),
        5: (torch.tensor([-16.0, -15.5, -15.0, 15.0, 15.5]), 2), 6: (torch.tensor([-32.0, -31.5, -31.0, 31.0, 31.5]), 2)}
SEARCH_CHUNK = 1 << 19  # weights searched together: 2 MiB of float32 per array, so the many passes run in cache


def search(w: torch.Tensor, imp: torch.Tensor, bits: int, starts: dict = NEAREST, lo: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (rows, blocks, block) and scales (rows, blocks, 1) of least importance-weighted error, on the
    levels lo .. 2^(bits-1)-1 (`lo` by default -2^(bits-1); GGUF's Q8_0 never stores -128).

    From each start scale, codes are rounded and the scale refit to them by least squares (`starts[bits]`).
    A candidate's error follows from the sums the refit already has (Σ iw² − s·Σ iqw at the refit scale),
    and only the best scale is kept: the codes are rounded once at the end (at least as good as the
    candidate's own, since nearest rounding at a fixed scale is optimal per weight). Rows go in chunks that
    stay in cache through the many passes of the search, which is what makes it cheap at 1-3B.
    """
    lo, hi = -(2 ** (bits - 1)) if lo is None else lo, 2 ** (bits - 1) - 1
    divisors, refits = starts[bits]
    scales = torch.empty(w.shape[:-1] + (1,))
    chunk = max(1, SEARCH_CHUNK // max(1, w[0].numel()))
    for start in range(0, w.shape[0], chunk):
        part = w[start:start + chunk]
        extreme = part.gather(-1, part.abs().argmax(-1, keepdim=True))  # signed value of largest magnitude
        weighted = imp * part
        total = (weighted * part).sum(-1, keepdim=True)
        best_err, best = torch.full(extreme.shape, float("inf")), torch.zeros_like(extreme)
        for divisor in divisors:
            scale = extreme / divisor
            for _ in range(refits + 1):
                q = (part * _inverse(scale)).round_().clamp_(lo, hi)
                qw = (q * weighted).sum(-1, keepdim=True)
                qq = (q.square_() * imp).sum(-1, keepdim=True)
                scale = torch.where(qq > 0, qw / qq.clamp_min(1e-30), torch.zeros_like(qq))
            err = total - scale * qw
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
        scales[start:start + chunk] = best
    return (w * _inverse(scales)).round_().clamp_(lo, hi), scales


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)


@dataclass(frozen=True)
class SymmetricGrid:
    """GPTQ's grid (`edgeq.quant.gptq.Grid`) without the stored form: a block's scale comes from `search` on the
    error-updated weights of that block, rounded to the format's scale dtype; columns are then rounded one by one at it."""

    bits: int
    block: int
    scale_dtype: ClassVar[torch.dtype] = torch.float32

    @property
    def lo(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def hi(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def scales(self, weights: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        imp = importance.clamp_min(1e-12)
        _, scale = search(weights.unsqueeze(1), (imp / imp.mean()).view(1, 1, -1), self.bits, GPTQ, self.lo)
        return scale.view(-1).to(self.scale_dtype).float()

    def round(self, column: torch.Tensor, scale: torch.Tensor, index: int) -> torch.Tensor:
        """The levels as the format computes them: code × scale in the scale's dtype (one scale for every `index`
        of the block)."""
        return (self.codes(column, scale) * scale).to(self.scale_dtype).float()

    def affine(self, scales: torch.Tensor) -> tuple[torch.Tensor, float, int, int]:
        return scales.repeat_interleave(self.block, 1), 0.0, self.lo, self.hi

    def rescaled(self, scales: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        return (scales * factors).to(self.scale_dtype).float()

    def codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Integer codes (as floats) of weights at their scales."""
        return (w / torch.where(scale == 0, torch.ones_like(scale), scale)).round().clamp(self.lo, self.hi)
