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
SLICE_ELEMENTS = 1 << 20  # int8 weights are quantized this many elements at a time
# int4: each block's start scales, times its range over 15 steps (`_least_squares`); the search goes SEARCH_ELEMENTS
# weights at a time: 1 MiB arrays, the fastest of 2^15..2^19 on one core here (smaller ones pay per-op overhead)
INT4_STARTS = tuple(1 + k / 30 for k in (3, 1, -1, -3))  # 1.1, 1.033, 0.967, 0.9
SEARCH_ELEMENTS = 1 << 18
TINY = 1e-30  # below any sum of squared codes that are not all 0


def int4_bits(block: int) -> float:
    """int4 data, an fp16 scale and an int4 zero point per block."""
    return 4 + (16 + 4) / block


class CoreMLSpace:
    """What the Core ML converter writes (`linear_codes`), on the float16 weights the converted program holds: int4
    asymmetric in blocks of 16/32/64/128 inputs (int4 data, an fp16 scale and an int4 zero point per block; the
    range always contains 0), int8 symmetric per output channel (fp16 scale per row, -127..127), fp16. int4 rounding
    is weighted by the importance matrix when there is one, as the writer's is. Tensors never quantized (norms) stay
    float16."""

    format = "coreml"
    float_bytes = 2
    tied_head_types = ()  # a tied checkpoint's head is the table

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
        # From the float16 weights the program holds, as the writer does: the package is made from those, not from
        # the checkpoint's values.
        w = weight.astype(np.float16)
        if precision not in LINEAR_BLOCKS:
            return w.astype(np.float32)
        return dequantize(*linear_codes(w, precision, importance))

    def gptq_grid(self, precision, weight, importance):
        """int4 only: int8 and fp16 keep nearest rounding (`gptq_precisions`)."""
        return gptq_grid(precision) if precision in INT4_BLOCKS else None


def linear_codes(weight: np.ndarray, precision: str, importance: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(int8 codes, scales, int8 zero points or None) of a 2-D weight at a linear precision, scales in the weight's
    dtype, in the layout coremltools' quantizer writes (`optimize._utils.compute_qparams_by_dtype`).

    int8 is coremltools' values bit for bit (per channel, symmetric). int4 is rounded by `_least_squares`, weighting
    each input column's squared error by `importance` (mean squared input; None: unweighted): coremltools' own min/max
    rounding leaves about a tenth more squared error on SmolLM2's layers, and takes no importance. Both in torch, a
    slice of rows at a time so the temporaries stay small whatever the weight (and the int4 search's passes in cache)."""
    import torch

    rows, cols = weight.shape
    source = torch.from_numpy(weight)
    if precision != "int8":
        return _int4_codes(source, INT4_BLOCKS[precision], importance)
    codes, scales = torch.empty(rows, cols, dtype=torch.int8), torch.empty(rows, 1, dtype=source.dtype)
    step = max(1, SLICE_ELEMENTS // cols)
    for start in range(0, rows, step):
        part = slice(start, start + step)
        codes[part], scales[part] = _symmetric(source[part].float(), _rounding(source.dtype))
    return codes.numpy(), scales.numpy(), None


def _int4_codes(source, block: int, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`linear_codes` at int4, a block per row of each slice's (blocks, block) view."""
    import torch

    rows, cols = source.shape
    width = cols // block  # blocks per row
    codes = torch.empty(rows, cols, dtype=torch.int8)
    scales, zeros = torch.empty(rows, width, dtype=source.dtype), torch.empty(rows, width, dtype=torch.int8)
    step = max(1, SEARCH_ELEMENTS // cols)
    imp = None if importance is None else _importance(importance, cols, block).repeat(min(step, rows), 1)
    for start in range(0, rows, step):
        part = slice(start, start + step)
        n = source[part].shape[0]
        weights = None if imp is None else imp[:n * width]  # the same columns in every row
        q, scale, zero = _least_squares(source[part].float().view(-1, block), weights, source.dtype)
        codes[part], scales[part], zeros[part] = q.view(n, cols), scale.view(n, width), zero.view(n, width)
    return codes.numpy(), scales.numpy(), zeros.numpy()


def _importance(importance, cols: int, block: int):
    """Column weights as (blocks per row, block), mean 1, none below 1e-6: a block of columns that carry next to
    nothing is still rounded to its values, not to 0 by weighted sums that underflow."""
    import torch

    imp = torch.as_tensor(np.asarray(importance, dtype=np.float32).reshape(-1))
    if imp.numel() != cols:
        raise ValueError(f"importance has {imp.numel()} columns, the weight {cols}")
    mean = imp.mean()
    imp = (imp / mean if mean > 0 else torch.ones_like(imp)).clamp_min(1e-6)
    return imp.view(cols // block, block)


def _rounding(dtype):
    """Rounds float32 values to `dtype`, kept as float32: what numpy does after each float16 op."""
    return lambda x: x.to(dtype).float()


def _symmetric(rows, exact):
    """int8 codes -127..127 and each row's scale, (max - -max) / 254 as coremltools spells it.

    coremltools computes in numpy in the weight's dtype, and numpy does a float16 op in float32 and rounds the result to
    float16; `exact` does the same after each op here, in torch, whose float16 casts are vectorised where numpy's convert
    element by element (seconds at 1.5B parameters, not minutes). A tie decided in float32 would land a step away."""
    peak = rows.abs().amax(-1, keepdim=True)
    scale = exact(exact(peak + peak) / 254)
    return _int8(exact(rows / scale).round().clamp(-127, 127)), scale


def _least_squares(blocks, imp, dtype):
    """int4 codes, scales (in `dtype`) and zero points -8..7 of least (importance-weighted) squared error, for blocks
    as rows of `blocks` (`imp`: their columns' importance, laid out alike).

    The stored levels are scale × c, c = code - zero: 16 consecutive integers from `low` = -8 - zero, a window that
    holds 0. Each start scale (the block's range [min(w, 0), max(w, 0)] over 15 steps, times each of `INT4_STARTS`)
    puts the window at the range's centre; codes are rounded into it and the scale refit to them by least squares. A
    start's error is Σ iw² - scale·Σ iwc at its refit scale, so only its scale and window are kept, and the codes are
    rounded once at the end, at the chosen scale as stored (nearest rounding at a fixed scale and window is optimal
    per weight). Starts a few percent either side of the range's own scale reach other minima: these four, one refit
    each, came within 0.4% of the squared error of 71 starts with every window on SmolLM2's layers."""
    import torch

    lo, hi = blocks.amin(-1, keepdim=True).clamp_(max=0), blocks.amax(-1, keepdim=True).clamp_(min=0)
    weighted = blocks if imp is None else blocks * imp
    spread = _inverse(hi - lo)
    unit, middle = blocks * spread, (lo + hi) * spread  # the weights and the range's centre, in ranges
    best_gain, best_scale, best_low = torch.full_like(lo, -1.0), torch.zeros_like(lo), torch.zeros_like(lo)
    for start in INT4_STARTS:
        low = (middle * (7.5 / start) - 7.5).round_().clamp_(-15, 0)
        # steps above `low` clamped by scalars, then c: clamping by per-block tensors costs several times more
        c = (unit * (15 / start)).sub_(low).round_().clamp_(0, 15).add_(low)
        wc = (c * weighted).sum(-1, keepdim=True)
        cc = (c.square_() if imp is None else c.square_().mul_(imp)).sum(-1, keepdim=True)
        scale = wc / cc.clamp_min(TINY)  # all codes 0 (an all-zero block): wc = 0, scale 0
        gain = scale * wc
        better = gain > best_gain
        best_gain, best_scale = gain.where(better, best_gain), scale.where(better, best_scale)
        best_low = low.where(better, best_low)
    scale = best_scale.clamp_(max=torch.finfo(dtype).max).to(dtype)
    codes = (blocks * _inverse(scale.float())).sub_(best_low).round_().clamp_(0, 15).sub_(8)
    return _int8(codes), scale, _int8(-8 - best_low)


def _inverse(scale):
    """1 / scale, and 0 for a scale of 0 (an all-zero block, or a scale too small for float16)."""
    return scale.reciprocal().nan_to_num_(posinf=0.0)


def _int8(x):
    """Integral float32 values as int8. An all-zero row at int8 (scale 0, codes 0/0) gets codes 0, what coremltools'
    cast of that NaN gives on x86; its dense value is 0 whatever the codes."""
    return x.nan_to_num_(0.0).char()


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None) -> np.ndarray:
    """The float32 weight `constexpr_blockwise_shift_scale` computes from `linear_codes`: scale × (code - zero), in
    the scales' dtype."""
    rows, cols = codes.shape
    blocks = codes.reshape(rows, scales.shape[1], -1).astype(np.float32)
    if zeros is not None:
        blocks -= zeros[..., None]
    return (blocks * scales[..., None].astype(np.float32)).astype(scales.dtype).astype(np.float32).reshape(rows, cols)


def gptq_grid(precision: str):
    """GPTQ's grid for an int4 precision (`edgeq.quant.gptq.Grid`): symmetric levels -8..7 at an fp16 scale per block,
    stored as `linear_codes`' layout with every zero point 0, so what GPTQ rounds to is what the package holds."""
    import torch

    from edgeq.quant.grid import SymmetricGrid

    class CoreMLGrid(SymmetricGrid):
        scale_dtype = torch.float16

        def encode(self, rounded, scales) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            rows, cols = rounded.shape
            codes = self.codes(rounded.view(rows, -1, self.block), scales.view(rows, -1, 1)).view(rows, cols)
            return codes.char().numpy(), scales.half().numpy(), np.zeros(scales.shape, dtype=np.int8)

    return CoreMLGrid(4, INT4_BLOCKS[precision])


class CoreMLFormat(FormatSpec):
    name = "coreml"
    runtime = "coreml"
    converter_target = "edgeq.converters.coreml.convert:CoreMLConverter"
    precisions = PRECISIONS
    default_precision = "int4"
    float_precision = "fp16"  # the package computes in float16
    planned_precision = "int4"  # the base of a planned export; the plan names every weight
    nominal_bpw = {"int4": 5.0, **{p: int4_bits(b) for p, b in INT4_BLOCKS.items() if p != "int4"},
                   "int8": 8.0, "palettize4": 4.0, "palettize6": 6.0, "fp16": 16.0}
    options = ("rounding",)
    # GPTQ on the user's calibration text (0.53x nearest's KL on Qwen2.5-Coder-0.5B); without text, nearest, as
    # GPTQ's pass over the float model takes several times the conversion (bench/README.md)
    roundings = ("gptq", "nearest", "learned")
    gptq_needs_text = True
    gptq_precisions = tuple(INT4_BLOCKS)
    kv_element_bytes = 2  # the package's key/value state is float16
    hub_library = "coreml"
    run_elsewhere = ("With Core ML (macOS 15 / iOS 18): load `{model_file}` as an `MLModel` (Swift) or with "
                     "`coremltools.models.MLModel` (Python); it is stateful (the key/value cache is an `MLState`), with "
                     "`prefill` and `decode` functions.")
    kept_adapters = "functions prefill_NAME / decode_NAME of the multifunction package, over the base's shared weights"
    export_bytes_per_weight = 10  # a traced float32 decoder plus coremltools' float16 copy

    @property
    def eval_runtime(self) -> str:
        """Core ML predicts on Apple platforms only; elsewhere quality is measured on the package's weights in torch."""
        return "coreml" if sys.platform == "darwin" else "coreml-torch"

    def file_overhead(self, source, tensors, context):
        # the program spec of two functions names every weight op twice; weights align to 64 bytes
        return tensors * (2 * 1024 + 64) + (256 << 10)

    def space(self):
        return CoreMLSpace()


COREML = CoreMLFormat()
