"""ExecuTorch's facts for the rest of edgeq: precisions, nominal sizes, pins, the planner's space. Imports no torch.

A precision names how XNNPACK computes each linear layer: `8da4w` is int8 activations quantized per token at run time
times int4 weights in groups of 32 inputs (Meta's Llama 3.2 recipe), `-g64`/`-g128` wider groups, `8da8w` int8
weights per output channel, `fp32` none. Weight-only `4w`/`8w` are refused (`WEIGHT_ONLY`).
"""
from __future__ import annotations

from importlib import metadata

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.formats import FormatSpec

from .layouts import LINEARS, PRECISIONS

# The versions the `executorch` extra pins: the executorch wheel links libtorch without declaring the torch it was
# built against, so a mismatch surfaces as an undefined symbol deep in an import; it is refused by name first.
ETRECORD_FILE = "etrecord.bin"  # the program's debug record in a bundle (graphs, no weights), for `edgeq profile --etdump`
PINS = {"executorch": "1.5.1", "torchao": "0.18.0", "torch": "2.13.0"}


# Weight-only precisions are refused: XNNPACK has no weight-only integer fully-connected kernel, and ExecuTorch 1.5.1
# lowered torchao's weight-only int4/int8 linears to a float32 filter that computed wrong values (relative error ~1 on
# a 64x96 test layer here), with no size saved.
WEIGHT_ONLY = ("4w", "8w")


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
    is the converter's own nearest rounding (`quant.nearest_codes`, importance-weighted), float32 values for fp32.
    The embedding table is a lookup outside the delegate, stored on its precision's weight grid."""

    format = "executorch"
    float_bytes = 4
    # The table is a lookup and the head a linear layer, so a tied checkpoint's head is a tensor to plan. GPTQ cannot
    # round it (the float model's head is the table's tensor), and at 8da4w by nearest it cost SmolLM2-135M more than
    # the 8da8w linears its bytes bought (planned 1.10x the uniform's KL; bench/README.md): it keeps 8 bits or more.
    tied_head_types = ("8da8w", "fp32")

    def candidates(self, shape):
        usable = [p for p, linear in LINEARS.items() if linear.dynamic and (not linear.group or shape[-1] % linear.group == 0)]
        return sorted(usable + ["fp32"], key=lambda p: self.nbytes(p, shape))

    def nbytes(self, precision, shape):
        return 4 * int(np.prod(shape)) if precision == "fp32" else LINEARS[precision].nbytes(shape)

    def round_trip(self, weight, precision, importance):
        if precision == "fp32":
            return weight.astype(np.float32)
        import torch

        from edgeq.converters.executorch.quant import nearest_codes

        linear = LINEARS[precision]
        codes, scales = nearest_codes(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)), linear, importance)
        group = linear.group or weight.shape[1]
        return (codes.float().view(weight.shape[0], -1, group) * scales.view(weight.shape[0], -1, 1)).reshape(weight.shape).numpy()

    def gptq_grid(self, precision, weight, importance):
        if precision == "fp32":
            return None
        from edgeq.converters.executorch.quant import gptq_grid

        return gptq_grid(weight, precision, importance)


class ExecuTorchFormat(FormatSpec):
    name = "executorch"
    runtime = "executorch"
    converter_target = "edgeq.converters.executorch.convert:ExecuTorchConverter"
    precisions = PRECISIONS
    default_precision = "8da4w"
    float_precision = "fp32"
    planned_precision = "8da4w"
    nominal_bpw = {p: LINEARS[p].bits + (16 / LINEARS[p].group if LINEARS[p].group else 0.0) for p in LINEARS} | {"fp32": 32.0}
    options = ("rounding", "context")  # context: set by the export from the device, not a user option
    roundings = ("gptq", "nearest", "learned")
    gptq_precisions = tuple(LINEARS)
    kv_element_bytes = 4  # the static KV cache is float32, as XNNPACK and the custom sdpa kernel compute
    kept_adapters_refusal = ("a .pte holds its weights inside XNNPACK's packed blobs, and edgeq does not yet write LoRA "
                             "factors as separate .ptd data that the program switches per call")
    export_bytes_per_weight = 17  # the float32 decoder, torchao's quantized copy, the lowered program, the ETRecord's copy of the edge graph (codes: 1 B a weight)
    debug_files = (ETRECORD_FILE,)  # the ETRecord `edgeq profile --etdump` reads; the app ships only model.pte
    trace_reader = "edgeq.converters.executorch.etdump:read_trace"  # an ETDump, joined to the bundle's ETRecord

    def normalize(self, precision: str) -> str:
        if str(precision).lower() in WEIGHT_ONLY:
            raise EdgeqError(f"executorch precision {precision!r} (weight-only) is not offered: XNNPACK has no weight-only integer "
                             "linear kernel, and ExecuTorch 1.5.1 lowered it to float32 filters with wrong values; use 8da4w "
                             "or 8da8w (int8 activations per token)")
        return super().normalize(precision)

    def converter(self):
        check_installed()
        return super().converter()

    def read_trace(self, bundle, manifest, trace):
        check_installed()
        return super().read_trace(bundle, manifest, trace)

    def file_overhead(self, source, tensors, context):
        """What a plan does not price: RoPE's cos and sin over the static cache (float32, `rotary_dim` wide each), and
        the serialized program: 11-15 KB a layer in model.pte and 11 KB in the ETRecord (SmolLM2-135M, 30 layers,
        context 4096: 2.42 MB beside the priced weights in model.pte, 2.1 MB of it RoPE tables; 0.34 MB of ETRecord).
        A tied checkpoint's head, stored apart from the table, is priced by the plan (`tied_head_types`)."""
        from edgeq.model_shape import ModelShape

        shape = ModelShape.from_config(source.config)
        rope = 2 * 4 * context * (shape.rotary_dim or shape.head_dim)
        return rope + shape.layers * (28 << 10) + (20 << 10)

    def space(self):
        return ExecuTorchSpace()


EXECUTORCH = ExecuTorchFormat()
