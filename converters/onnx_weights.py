"""Weight encodings of the ONNX export, the streaming external-data writer, and the read-back report.

Every weight is named after its Hugging Face tensor, so a precision plan (keyed by HF names) can be
checked against the written file: `read_back` rebuilds each tensor's type from the node that consumes
it (MatMulNBits bits/block_size, GatherBlockQuantized bits, float dtype), not from what was asked.

Quantization is symmetric, as onnxruntime's kernels expect when no zero points are given (zero point
2^(bits-1)). Block scales are chosen per block by a small search over candidate scales with a
least-squares refit (weighted by the calibration importance when there is one): plain absmax rounding
wastes part of the 16 levels. `BlockGrid` offers the same encoding to GPTQ (`edgeq.quant.gptq`), which
exports use by default; `quantize_blocks` alone is `rounding="nearest"`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from edgeq.formats import readback

from .onnx_format import ALIGN as _ALIGN


@dataclass(frozen=True)
class Quantized:
    data: np.ndarray    # uint8 codes: (rows, blocks, block*bits/8) for MatMulNBits, (rows, cols*bits/8) for GatherBlockQuantized
    scales: np.ndarray  # float32 (rows, blocks)
    bits: int
    block_size: int


# Where each block's scale search starts (divisors of the block's signed absmax; -2^(b-1) puts the largest
# value on the one-sided extra level) and how often the scale is refit to the codes from each start.
# Nearest rounding is the quick path, and the planner's proxy: three starts and one refit, a few percent more
# weighted error than twenty starts and two refits at a sixth of the time (bench/README.md, ONNX export cost).
NEAREST = {4: (torch.tensor([-8.0, -7.0, 7.0]), 1), 8: (torch.tensor([-128.0, -127.0, 127.0]), 1)}
# GPTQ compensates rounding error itself, and rounds on scales searched once per block of a layer: five
# starts give it the KL of twenty.
GPTQ = {4: (torch.tensor([-8.0, -7.5, -7.0, 7.0, 7.5]), 2), 8: (torch.tensor([-128.0, -127.5, -127.0, 127.0, -128.5, -126.5]), 2)}
SEARCH_CHUNK = 1 << 19  # weights searched together: 2 MiB of float32 per array, so the many passes run in cache


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


def _search(w: torch.Tensor, imp: torch.Tensor, bits: int, starts: dict = NEAREST) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (rows, blocks, block) and scales (rows, blocks, 1) of least importance-weighted error.

    From each start scale, codes are rounded and the scale refit to them by least squares (`starts[bits]`).
    A candidate's error follows from the sums the refit already has (Σ iw² − s·Σ iqw at the refit scale),
    and only the best scale is kept: the codes are rounded once at the end (at least as good as the
    candidate's own, since nearest rounding at a fixed scale is optimal per weight). Rows go in chunks that
    stay in cache through the many passes of the search, which is what makes it cheap at 1-3B.
    """
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
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


def _pack(q: torch.Tensor, scales: torch.Tensor, bits: int, block_size: int) -> Quantized:
    codes = (q + 2 ** (bits - 1)).to(torch.uint8).numpy()
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return Quantized(np.ascontiguousarray(codes), scales.reshape(q.shape[0], -1).numpy().astype(np.float32), bits, block_size)


def quantize_blocks(weight: torch.Tensor, bits: int, block_size: int, importance: np.ndarray | None = None) -> Quantized:
    """Symmetric block-wise quantization of a (rows, cols) weight along its columns (the input dimension)."""
    w, imp = _padded_blocks(weight, importance, block_size)
    q, scales = _search(w, imp, bits)
    return _pack(q, scales, bits, block_size)


@dataclass(frozen=True)
class BlockGrid:
    """The same encoding as GPTQ's grid (`edgeq.quant.gptq.Grid`): a block's scale comes from the search above,
    run on the error-updated weights of that block; columns are then rounded one by one at it."""

    bits: int
    block: int

    @property
    def lo(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def hi(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def scales(self, weights: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        imp = importance.clamp_min(1e-12)
        _, scale = _search(weights.unsqueeze(1), (imp / imp.mean()).view(1, 1, -1), self.bits, GPTQ)
        return scale.view(-1)

    def round(self, column: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self._codes(column, scale) * scale

    def _codes(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (w / torch.where(scale == 0, torch.ones_like(scale), scale)).round().clamp(self.lo, self.hi)

    def encode(self, rounded: torch.Tensor, scales: torch.Tensor) -> Quantized:
        rows, cols = rounded.shape
        blocks = rounded.view(rows, cols // self.block, self.block)
        scales = scales.view(rows, -1, 1)
        return _pack(self._codes(blocks, scales), scales, self.bits, self.block)


def dequantize(q: Quantized, cols: int) -> np.ndarray:
    """The float weight a Quantized stands for (tests check onnxruntime reads our packing as this)."""
    codes = q.data
    if q.bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
    rows = codes.shape[0]
    codes = codes.reshape(rows, q.scales.shape[1], q.block_size).astype(np.float32) - 2 ** (q.bits - 1)
    return (codes * q.scales[..., None]).reshape(rows, -1)[:, :cols]


class ExternalData:
    """Appends tensors to one external-data file as they are made, so peak memory follows the largest tensor."""

    def __init__(self, folder: Path, filename: str):
        self.filename = filename
        self._file = open(folder / filename, "wb")
        self._offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes >= _ALIGN:
            pad = -self._offset % _ALIGN
            self._file.write(b"\0" * pad)
            self._offset += pad
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.filename), ("offset", str(self._offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._file.write(array.tobytes())
        self._offset += array.nbytes
        return tensor

    def close(self) -> None:
        self._file.close()


def _nbytes(tensor: TensorProto) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    return len(tensor.raw_data) or int(np.prod(tensor.dims)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _describe(name: str, tensor: TensorProto, consumer: onnx.NodeProto | None) -> dict:
    attrs = {a.name: helper.get_attribute_value(a) for a in consumer.attribute} if consumer is not None else {}
    if consumer is not None and consumer.op_type == "MatMulNBits":
        return {"type": f"int{attrs['bits']}", "block_size": attrs["block_size"], "shape": [tensor.dims[0], attrs["K"]]}
    if consumer is not None and consumer.op_type == "GatherBlockQuantized":
        rows, packed = tensor.dims
        return {"type": f"int{attrs['bits']}", "block_size": attrs["block_size"], "shape": [rows, packed * 8 // attrs["bits"]]}
    dtype = {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16"}.get(tensor.data_type, helper.tensor_dtype_to_string(tensor.data_type))
    shape = list(tensor.dims)
    if consumer is not None and consumer.op_type in ("MatMul", "Cast") and len(shape) == 2:
        shape = shape[::-1]  # linear weights are stored (in, out) for MatMul; report them as HF's (out, in)
    return {"type": dtype, "shape": shape}


def read_back(model_file: Path, planned: dict[str, str]) -> dict:
    """Types, shapes and bytes of every weight as written, real bits per weight, and where the file differs from `planned`."""
    model = onnx.load(str(model_file), load_external_data=False)
    consumers: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if index < 2 or node.op_type != "MatMulNBits":  # MatMulNBits' scales belong to their weight
                consumers.setdefault(name, node)
    for node in model.graph.node:  # weights packed for one kernel (q/k/v, gate/up) belong to the Concat's consumer
        if node.op_type == "Concat" and node.output[0] in consumers:
            for name in node.input:
                consumers[name] = consumers[node.output[0]]
    companions = {t.name: _nbytes(t) for t in model.graph.initializer if t.name.endswith(".scales")}
    tensors, mismatches = {}, []
    for t in model.graph.initializer:
        if not t.name.endswith((".weight", ".bias")):
            continue
        info = _describe(t.name, t, consumers.get(t.name))
        info["bytes"] = _nbytes(t) + companions.get(f"{t.name}.scales", 0)
        tensors[t.name] = info
        asked = planned.get(t.name)
        if asked and asked != info["type"]:
            mismatches.append({"tensor": t.name, "asked": asked, "got": info["type"], "why": "the writer did not apply the plan"})
    return readback(tensors, mismatches)
