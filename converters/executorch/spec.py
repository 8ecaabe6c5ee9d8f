"""ExecuTorch's facts for the rest of edgeq: precisions, nominal sizes, pins, the planner's space. Imports no torch.

A precision names how XNNPACK computes each linear layer: `8da4w` is int8 activations quantized per token at run time
times int4 weights in groups of 32 inputs (Meta's Llama 3.2 recipe), `-g64`/`-g128` wider groups, `8da8w` int8
weights per output channel, `4w`/`8w` weight-only (activations stay float32), `fp32` none.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.formats import FormatSpec

# The versions the `executorch` extra pins: the executorch wheel links libtorch without declaring the torch it was
# built against, so a mismatch surfaces as an undefined symbol deep in an import; it is refused by name first.
PINS = {"executorch": "1.5.1", "torchao": "0.18.0", "torch": "2.13.0"}


@dataclass(frozen=True)
class Linear:
    """How one precision stores a linear layer's weight: `bits` per weight, `group` inputs per scale (0: one scale per
    output channel), and whether activations are int8 per token at run time (`dynamic`, XNNPACK's qd8 kernels)."""

    bits: int
    group: int
    dynamic: bool

    def nbytes(self, shape) -> int:
        """Codes plus scales as the delegate stores them: int4 packed two to a byte with a bf16 scale per group (XNNPACK's
        blockwise layout), int8 a byte each with a float32 scale per output channel."""
        rows, cols = int(shape[0]), int(np.prod(shape[1:]))
        if self.group:
            return rows * cols * self.bits // 8 + rows * (cols // self.group) * 2
        return rows * cols * self.bits // 8 + rows * 4


LINEARS = {
    "8da4w": Linear(4, 32, True), "8da4w-g64": Linear(4, 64, True), "8da4w-g128": Linear(4, 128, True),
    "8da8w": Linear(8, 0, True), "4w": Linear(4, 32, False), "8w": Linear(8, 0, False),
}
PRECISIONS = (*LINEARS, "fp32")


def check_installed() -> None:
    """The pinned executorch, torchao and torch, or one line naming what is there, what is needed and the extra."""
    found = {}
    for name in PINS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    missing = [name for name, version in found.items() if version is None]
    if missing:
        raise EdgeqError(f"the executorch format needs {' and '.join(missing)}, which is not installed; "
                         "install it with: pip install 'edgeq[executorch]'")
    wrong = {name: version for name, version in found.items() if version.split("+")[0] != PINS[name]}
    if wrong:
        have = ", ".join(f"{name} {version}" for name, version in found.items())
        want = ", ".join(f"{name}=={version}" for name, version in PINS.items())
        raise EdgeqError(f"executorch {found['executorch']} runs only with the torch it was built against: found {have}, "
                         f"need {want}; install them with: pip install 'edgeq[executorch]'")


class ExecuTorchSpace:
    """What the converter writes for each linear layer (`LINEARS`), priced by the layout XNNPACK stores; the round trip
    is the symmetric grid the converter rounds to (`edgeq.quant.grid.search`, importance-weighted), float32 values
    for fp32. The embedding table is a lookup the delegate does not run: it is kept at 8 bits per output row
    (`8w`) or float32."""

    format = "executorch"
    float_bytes = 4

    def candidates(self, shape):
        usable = [p for p, linear in LINEARS.items() if linear.dynamic and (not linear.group or shape[-1] % linear.group == 0)]
        return sorted(usable + ["fp32"], key=lambda p: self.nbytes(p, shape))

    def nbytes(self, precision, shape):
        return 4 * int(np.prod(shape)) if precision == "fp32" else LINEARS[precision].nbytes(shape)

    def round_trip(self, weight, precision, importance):
        if precision == "fp32":
            return weight.astype(np.float32)
        import torch

        from edgeq.quant.grid import search

        linear = LINEARS[precision]
        w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        group = linear.group or w.shape[1]
        imp = torch.ones(group) if importance is None else torch.as_tensor(np.asarray(importance, np.float32))
        imp = (imp / imp.mean().clamp_min(1e-12)).clamp_min(1e-6).view(1, -1, group) if importance is not None else imp.view(1, 1, -1)
        codes, scales = search(w.view(w.shape[0], -1, group), imp, linear.bits)
        if linear.group:
            scales = scales.to(torch.bfloat16).float()
        return (codes * scales).view(w.shape).numpy()


class ExecuTorchFormat(FormatSpec):
    name = "executorch"
    runtime = "executorch"
    converter_target = "edgeq.converters.executorch.convert:ExecuTorchConverter"
    precisions = PRECISIONS
    default_precision = "8da4w"
    float_precision = "fp32"
    planned_precision = "8da4w"
    nominal_bpw = {p: LINEARS[p].bits + (16 / LINEARS[p].group if LINEARS[p].group else 0.0) for p in LINEARS} | {"fp32": 32.0}
    options = ("rounding",)
    roundings = ("gptq", "nearest")
    gptq_precisions = tuple(LINEARS)
    kv_element_bytes = 4  # the static KV cache is float32, as XNNPACK and the custom sdpa kernel compute
    kept_adapters_refusal = ("a .pte holds its weights inside XNNPACK's packed blobs, and edgeq does not yet write LoRA "
                             "factors as separate .ptd data that the program switches per call")
    export_bytes_per_weight = 16  # the float32 decoder, torchao's quantized copy and the lowered program

    def converter(self):
        check_installed()
        return super().converter()

    def space(self):
        return ExecuTorchSpace()


EXECUTORCH = ExecuTorchFormat()
