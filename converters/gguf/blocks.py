"""GGUF's own block types as GPTQ grids (`edgeq.quant.gptq.Grid`): each block's scales searched in the form its type
stores them, columns rounded to those very levels, and the result packed byte for byte in ggml's layout, so that
what GPTQ optimized is what any llama.cpp reads (tests dequantize the bytes with gguf-py and with ggml itself).

- Q8_0, Q5_0, Q4_0: 32 columns share an fp16 scale d; the levels are d·q, q in -127..127, -16..15, -8..7.
- Q6_K: a super-block of 256 columns has an fp16 scale d and an int8 scale s per 16 columns: d·s·q, q in -32..31.
- Q4_K, Q5_K: a super-block of 256 has fp16 d and dmin and, per 32 columns, a 6-bit scale s and minimum m:
  d·s·q - dmin·m, q in 0..15 (0..31).

GPTQ's block is the super-block: its scales are searched on the error-updated weights when GPTQ reaches it (ggml's own
kind of search: a least-squares refit from several start scales, weighted by the calibration's importance), then
quantized to the type's fields, and every column of it is rounded at what those fields give, in float32 as ggml
dequantizes (d·s first, then times the code).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgeq.quant.grid import GPTQ, SymmetricGrid, search

SUPER = 256
ASYMMETRIC_STEPS = 20  # refits from scales nmax-1 .. nmax+1 steps over the range, as ggml's K-quant search tries


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-65504, 65504).half().float()


def _inverse(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.zeros_like(x), 1 / x)


def _normalized(importance: torch.Tensor) -> torch.Tensor:
    imp = importance.float().clamp_min(1e-12)
    return imp / imp.mean()


def _halves(d: torch.Tensor) -> np.ndarray:
    """fp16 values (…,) as their two little-endian bytes (…, 2)."""
    return d.half().numpy().view(np.uint8).reshape(*d.shape, 2)


@dataclass(frozen=True)
class LegacyGrid(SymmetricGrid):
    """Q8_0, Q5_0, Q4_0: blocks of 32 with one fp16 scale."""

    scale_dtype = torch.float16

    @property
    def lo(self) -> int:
        return -127 if self.bits == 8 else super().lo  # ggml never writes -128 into Q8_0

    def round(self, column: torch.Tensor, scale: torch.Tensor, index: int) -> torch.Tensor:
        return self.codes(column, scale) * scale  # ggml multiplies the fp16 scale out in float32

    def encode(self, rounded: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
        rows, cols = rounded.shape
        d = scales.reshape(rows, -1)
        q = self.codes(rounded.view(rows, -1, 32), d.unsqueeze(-1)).to(torch.int16)
        head = _halves(d)
        if self.bits == 8:
            body = q.to(torch.int8).numpy().view(np.uint8)
        else:
            u = (q - self.lo).numpy().astype(np.uint8)  # 0..15 or 0..31
            low = (u[..., :16] & 15) | ((u[..., 16:] & 15) << 4)
            if self.bits == 4:
                body = low
            else:
                bits = ((u >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
                high = bits.sum(-1, dtype=np.uint32)[..., None].view(np.uint8)  # little-endian uint32
                body = np.concatenate([high, low], -1)
        return np.concatenate([head, body], -1).reshape(rows, -1)


@dataclass(frozen=True)
class Q6KGrid:
    """Q6_K: per super-block, d (fp16) and 16 int8 scales; levels d·s·q, q in -32..31."""

    block: int = SUPER
    sub: int = 16

    def scales(self, weights: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        rows = weights.shape[0]
        imp = _normalized(importance).view(1, -1, self.sub)
        _, s = search(weights.reshape(rows, -1, self.sub), imp, 6, GPTQ)
        s = s.view(rows, -1)
        extreme = s.gather(-1, s.abs().argmax(-1, keepdim=True))  # signed: -128 takes the largest, as ggml does
        d = _half(extreme / -128)
        sc = (s * _inverse(d)).round().clamp(-128, 127)
        return torch.cat([d, sc], -1)

    def _step(self, params: torch.Tensor, index: int) -> torch.Tensor:
        return params[:, 0] * params[:, 1 + index // self.sub]

    def affine(self, params: torch.Tensor) -> tuple[torch.Tensor, float, int, int]:
        return (params[..., :1] * params[..., 1:]).repeat_interleave(self.sub, -1).flatten(1), 0.0, -32, 31

    def rescaled(self, params: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """The super-block's fp16 d times its factor; the int8 sub-block scales stay."""
        return torch.cat([_half(params[..., :1] * factors.unsqueeze(-1)), params[..., 1:]], -1)

    def round(self, column: torch.Tensor, params: torch.Tensor, index: int) -> torch.Tensor:
        step = self._step(params, index)
        return (column * _inverse(step)).round().clamp(-32, 31) * step

    def encode(self, rounded: torch.Tensor, params: torch.Tensor) -> np.ndarray:
        rows, cols = rounded.shape
        n = cols // SUPER
        step = (params[..., :1] * params[..., 1:]).repeat_interleave(self.sub, -1)  # (rows, n, 256)
        q = (rounded.view(rows, n, SUPER) * _inverse(step)).round().clamp(-32, 31)
        u = (q + 32).to(torch.uint8).numpy().reshape(rows, n, 2, 4, 32)  # [half, quarter, column]
        low = np.concatenate([(u[..., 0, :] & 15) | ((u[..., 2, :] & 15) << 4),
                              (u[..., 1, :] & 15) | ((u[..., 3, :] & 15) << 4)], -1)  # (rows, n, 2, 64)
        high = sum((u[..., k, :] >> 4) << (2 * k) for k in range(4)).astype(np.uint8)  # (rows, n, 2, 32)
        scales = params[..., 1:].to(torch.int8).numpy().view(np.uint8)
        return np.concatenate([low.reshape(rows, n, 128), high.reshape(rows, n, 64), scales, _halves(params[..., 0])],
                              -1).reshape(rows, -1)


def _asymmetric(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of `x` (…, block), the scale a ≥ 0 and minimum m ≥ 0 of least `w`-weighted squared error on the
    levels a·q - m, q in 0..nmax: from the range's own scale and from `ASYMMETRIC_STEPS` others around it, codes
    are rounded and (a, m) refit to them by weighted least squares (m held at 0 where the fit would make it negative)."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    span = x.amax(-1, keepdim=True) - lo
    wx = w * x
    sw, swx, swxx = w.sum(-1, keepdim=True).expand_as(span), wx.sum(-1, keepdim=True), (wx * x).sum(-1, keepdim=True)
    best_a, best_b = span / nmax, lo.clone()
    best_err = (w * ((x - lo) * _inverse(best_a)).round().clamp(0, nmax).mul(best_a).add(lo).sub(x).square()).sum(-1, keepdim=True)
    unit = (x - lo) * _inverse(span)
    for k in range(ASYMMETRIC_STEPS + 1):
        q = (unit * (nmax - 1 + 2 * k / ASYMMETRIC_STEPS)).round_().clamp_(0, nmax)
        wq = w * q
        swq, swqq, swqx = wq.sum(-1, keepdim=True), (wq * q).sum(-1, keepdim=True), (q * wx).sum(-1, keepdim=True)
        det = sw * swqq - swq * swq
        a = (sw * swqx - swq * swx) * _inverse(det)
        b = (swqq * swx - swq * swqx) * _inverse(det)
        positive = b > 0
        a = torch.where(positive, swqx * _inverse(swqq), a)
        b = torch.where(positive, torch.zeros_like(b), b)
        # Σ w (a·q + b - x)² from the sums the fit already has
        err = swxx - 2 * (a * swqx + b * swx) + a * a * swqq + 2 * a * b * swq + b * b * sw
        better = (err < best_err) & (a >= 0)
        best_err, best_a, best_b = err.where(better, best_err), a.where(better, best_a), b.where(better, best_b)
    return best_a.squeeze(-1), (-best_b).squeeze(-1)


@dataclass(frozen=True)
class KGrid:
    """Q4_K (bits 4) and Q5_K (bits 5): per super-block fp16 d and dmin, per 32 columns 6-bit scale s and minimum m."""

    bits: int
    block: int = SUPER
    sub: int = 32

    @property
    def nmax(self) -> int:
        return 2 ** self.bits - 1

    def scales(self, weights: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        rows = weights.shape[0]
        a, m = _asymmetric(weights.reshape(rows, -1, self.sub), _normalized(importance).view(1, -1, self.sub), self.nmax)
        d, dmin = _half(a.amax(-1, keepdim=True) / 63), _half(m.amax(-1, keepdim=True) / 63)
        sc, mn = self._refit(weights.reshape(rows, -1, self.sub), _normalized(importance).view(1, -1, self.sub),
                             (a * _inverse(d)).round().clamp(0, 63), (m * _inverse(dmin)).round().clamp(0, 63), d, dmin)
        return torch.cat([d, dmin, sc, mn], -1)

    def _refit(self, x, w, sc, mn, d, dmin):
        """The 6-bit scale and minimum of each sub-block, among the nearest ones ±1, of least weighted error at
        nearest rounding: rounding the fitted pair to 6 bits alone loses most in the sub-blocks of small range."""
        best = (torch.full_like(sc, float("inf")), sc, mn)
        for ds in (-1, 0, 1):
            for dm in (-1, 0, 1):
                s, m = (sc + ds).clamp(0, 63), (mn + dm).clamp(0, 63)
                step, low = (d * s).unsqueeze(-1), (dmin * m).unsqueeze(-1)
                y = ((x + low) * _inverse(step)).round().clamp(0, self.nmax) * step - low
                err = (w * (y - x).square()).sum(-1)
                better = err < best[0]
                best = (err.where(better, best[0]), s.where(better, best[1]), m.where(better, best[2]))
        return best[1], best[2]

    def _levels(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = (params.shape[-1] - 2) // 2
        return params[..., 0:1] * params[..., 2:2 + n], params[..., 1:2] * params[..., 2 + n:]  # (…, subs) steps and minimums

    def affine(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        step, low = (t.repeat_interleave(self.sub, -1).flatten(1) for t in self._levels(params))
        return step, low, 0, self.nmax

    def rescaled(self, params: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """The super-block's fp16 d times its factor; dmin and the 6-bit sub-block scales and minimums stay."""
        return torch.cat([_half(params[..., :1] * factors.unsqueeze(-1)), params[..., 1:]], -1)

    def round(self, column: torch.Tensor, params: torch.Tensor, index: int) -> torch.Tensor:
        s = index // self.sub
        n = (params.shape[-1] - 2) // 2
        step, low = params[:, 0] * params[:, 2 + s], params[:, 1] * params[:, 2 + n + s]
        return ((column + low) * _inverse(step)).round().clamp(0, self.nmax) * step - low

    def encode(self, rounded: torch.Tensor, params: torch.Tensor) -> np.ndarray:
        rows, cols = rounded.shape
        n = cols // SUPER
        step, low = (t.repeat_interleave(self.sub, -1) for t in self._levels(params))  # (rows, n, 256)
        q = ((rounded.view(rows, n, SUPER) + low) * _inverse(step)).round().clamp(0, self.nmax)
        u = q.to(torch.uint8).numpy().reshape(rows, n, 8, 32)
        sc, mn = (params[..., 2:10].to(torch.uint8).numpy(), params[..., 10:].to(torch.uint8).numpy())
        packed = np.concatenate([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                                 (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)], -1)  # 12 bytes
        low4 = ((u[:, :, 0::2] & 15) | ((u[:, :, 1::2] & 15) << 4)).reshape(rows, n, 128)
        parts = [_halves(params[..., 0]), _halves(params[..., 1]), packed]
        if self.bits == 5:
            parts.append(sum(((u[:, :, s] >> 4) & 1) << s for s in range(8)).astype(np.uint8))  # qh: bit s for sub-block s
        return np.concatenate([*parts, low4], -1).reshape(rows, -1)


GRIDS = {"Q8_0": LegacyGrid(8, 32), "Q5_0": LegacyGrid(5, 32), "Q4_0": LegacyGrid(4, 32),
         "Q6_K": Q6KGrid(), "Q5_K": KGrid(5), "Q4_K": KGrid(4)}


def grid_for(type_name: str, width: int):
    """GPTQ's grid for a tensor stored as `type_name` with rows of `width`, or None where edgeq has none (the type's
    bytes then stay llama.cpp's)."""
    grid = GRIDS.get(type_name)
    return grid if grid is not None and width % grid.block == 0 else None
