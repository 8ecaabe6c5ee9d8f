"""ONNX's facts for the rest of edgeq: precisions, INT4 block rule, nominal sizes, the planner's space.

Imports neither onnx nor onnxruntime (the round trip imports the converter's quantizer on first use).
"""
from __future__ import annotations

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.formats import FormatSpec

FLOAT_TYPES = ("fp32", "fp16")
BLOCK_SIZES = (16, 32, 64, 128, 256)
# int4 tensor types named by their block, for a plan (or an override): smaller blocks where a tensor is sensitive, larger
# where it is not, so a plan moves bytes between tensors at one file size, as Core ML's plans do. Plain "int4" is the
# converter's default block (`int4_block`).
INT4_BLOCKS = {"int4-block16": 16, "int4-block32": 32, "int4-block64": 64, "int4-block128": 128}
TENSOR_TYPES = ("int4", *INT4_BLOCKS, "int8", "fp16", "fp32")
# INT4 block when none is asked: with float16 scales 32 (Q4_0's layout and bytes), with float32 scales 64 for the
# same bytes; else the next that divides the width (bench/README.md has the KL of each).
DEFAULT_INT4_BLOCKS = {True: (32, 16), False: (64, 32, 16)}
INT8_BLOCK = 32  # Q8_0's layout
# The embedding table at INT8 (and a tied head that reads it): blocks of 64, half the scales' bytes. On SmolLM2-135M
# (a 49152 × 576 table, a third of its int4 file) that is 1% of the file for +0.4% KL (bench/README.md); it pays for a
# rotated tied head's mix.
TABLE_INT8_BLOCK = 64
# Float16 scales make MatMulNBits compute in float16: a layer whose calibration activations (in or out) reach past
# this computes on them divided by a power of two, to stay 8x short of float16's 65504
# (`edgeq.quant.importance.activation_peaks`).
HALF_PEAK = 8192.0
# Arrays over ALIGN_ABOVE start on an ALIGN boundary in the external-data file, so onnxruntime can memory-map them on
# any OS (64 KiB is Windows' allocation granularity); onnx's and onnxruntime's own savers use the same pair. Aligning
# every array of 64 KiB or more cost 17.7 MB on Qwen2.5-Coder-0.5B's int4 file (bench/README.md).
ALIGN = 64 * 1024
ALIGN_ABOVE = 1 << 20


def type_bits(kind: str) -> int | None:
    """Bits per code of an integer tensor type (4 or 8); None for a float one."""
    return 4 if kind == "int4" or kind in INT4_BLOCKS else 8 if kind == "int8" else None


def int4_block(width: int, asked: int | None = None, half: bool = True) -> int | None:
    """The INT4 block for a matrix `width` inputs wide: the one asked if it divides, else the default rule for its scales'
    dtype (`half`: float16); None if none fits."""
    for block in (asked,) if asked else DEFAULT_INT4_BLOCKS[half]:
        if width % block == 0:
            return block
    return None


class ONNXSpace:
    """What the ONNX converter writes: symmetric blocks with float16 scales, int4 in blocks of 16-128 (plain "int4"
    is the converter's default block, see `int4_block`) and int8 in blocks of 32 (MatMulNBits), rounded by the
    converter's importance-weighted scale search; or fp16. (An export rounds by GPTQ on top, which only lowers the
    error priced here.)"""

    format = "onnx"
    float_bytes = 4
    tied_head_types = ()  # a tied checkpoint's head is the table

    @staticmethod
    def _block(precision: str, shape) -> int | None:
        if precision == "int4":
            return int4_block(shape[-1])
        return INT4_BLOCKS.get(precision, INT8_BLOCK)

    def candidates(self, shape):
        default = self._block("int4", shape)
        usable = ["int4"] if default else []
        usable += [kind for kind, block in INT4_BLOCKS.items() if shape[-1] % block == 0 and block != default]
        return sorted(usable + ["int8", "fp16"], key=lambda kind: self.nbytes(kind, shape))

    def nbytes(self, precision, shape):
        n = int(np.prod(shape))
        if precision == "fp16":
            return 2 * n
        return n * type_bits(precision) // 8 + -(-shape[-1] // self._block(precision, shape)) * shape[0] * 2

    def round_trip(self, weight, precision, importance):
        if precision == "fp16":
            return weight.astype(np.float16).astype(np.float32)
        import torch

        from .blocks import dequantize, quantize_blocks

        block = self._block(precision, weight.shape)
        q = quantize_blocks(torch.from_numpy(np.ascontiguousarray(weight)), type_bits(precision), block, importance, half=True)
        return dequantize(q, weight.shape[1])

    def gptq_grid(self, precision, weight, importance):
        """The float16-scaled blocks the round trip prices (an export keeps float32 scales only where activations
        would overflow float16)."""
        if type_bits(precision) is None:
            return None
        from .blocks import HalfBlockGrid

        return HalfBlockGrid(type_bits(precision), self._block(precision, weight.shape))


class ONNXFormat(FormatSpec):
    name = "onnx"
    runtime = "ort"
    converter_target = "edgeq.converters.onnx.convert:ONNXConverter"
    precisions = ("int4", "int8", "fp16", "fp32")
    default_precision = "int4"
    float_precision = "fp32"
    planned_precision = "int4"  # the base of a planned export; the plan names every matrix
    nominal_bpw = {"int4": 5.0, "int8": 8.5, "fp16": 16.0, "fp32": 32.0}
    options = ("mobile", "block_size", "rounding")
    roundings = ("gptq", "nearest", "learned")
    gptq_precisions = ("int4", "int8")
    # GPTQ on the rotated model: 0.76x the KL on SmolLM2-135M, 0.79x on Qwen2.5-Coder-0.5B, at the same bytes (a tied
    # table stays one through the head's mix; bench/README.md)
    rotates_by_default = True
    kv_element_bytes = 4  # onnxruntime's GroupQueryAttention cache is float32 in this graph
    kept_adapters = "onnxruntime adapter files (.onnx_adapter) over LoRA inputs of the graph"
    export_bytes_per_weight = 12  # the float model for GPTQ beside the graph being written
    hub_library = "onnx"
    run_elsewhere = ("With onnxruntime: `{model_file}` is a decoder graph with a key/value cache (input ids, positions and "
                     "the cache in; logits and the updated cache out), which `edgeq.load()` drives; `tokenizer.json` and "
                     "`chat_template.jinja` render the prompt. onnxruntime-genai needs a `genai_config.json` describing the "
                     "graph, which edgeq does not write.")

    def file_overhead(self, source, tensors, context):
        # the float32 cos/sin tables of each RoPE over the trained context (8.4 MB on Qwen2.5-Coder-0.5B's 32k); each
        # array over ALIGN_ABOVE in the default int4 layout (codes, and float16 scales in blocks of 32) pays half an
        # ALIGN on average before it; the graph holds about a kilobyte per node. A plan whose file still comes out
        # larger is planned again by the excess.
        from edgeq.model_shape import ModelShape

        shape = ModelShape.from_config(source.config)
        pairs = sum(2 if rope.kind == "longrope" else 1 for rope in shape.distinct_ropes())
        rope_tables = pairs * 2 * shape.max_positions * (shape.rotary_dim // 2) * 4
        aligned = 0
        for dims in source.shapes().values():
            n = int(np.prod(dims))
            aligned += (n // 2 > ALIGN_ABOVE) + (n // DEFAULT_INT4_BLOCKS[True][0] * 2 > ALIGN_ABOVE)
        return rope_tables + aligned * ALIGN // 2 + tensors * 1024

    def space(self):
        return ONNXSpace()

    def stored_once(self, source) -> dict[str, str]:
        """A rotated tied head (its own tensor in the rotated checkpoint) reads the one table through its mix
        (`edgeq.quant.rotation.head_mix`), stored once when both get one integer type."""
        from edgeq.quant.rotation import head_mix

        return {"lm_head.weight": "model.embed_tokens.weight"} if head_mix(source) is not None else {}

    def tensor_type(self, asked: str) -> str:
        """A precision, or an int4 type named by its block (`int4-block64`): what a plan or `--tensor-type` names."""
        name = str(asked).lower()
        if name in TENSOR_TYPES:
            return name
        raise EdgeqError(f"unknown ONNX tensor type {asked!r}; use one of {', '.join(TENSOR_TYPES)}")

    def check_source(self, source) -> None:
        """onnxruntime's GroupQueryAttention rotates part of a head only in multiples of 16 dims (its cos/sin tables
        a multiple of 8 wide); Phi-4-mini's 96 of 128 is one."""
        from edgeq.model_shape import ModelShape

        shape = ModelShape.from_config(source.config)
        if shape.rotary_dim != shape.head_dim and (shape.rotary_dim // 2) % 8:
            raise EdgeqError(f"{source.architecture} with partial_rotary_factor = {shape.rotary_dim / shape.head_dim} rotates "
                             f"{shape.rotary_dim} dims per head, which onnxruntime's GroupQueryAttention cannot (a multiple of 16 "
                             "is needed); export GGUF or Core ML")


ONNX = ONNXFormat()
