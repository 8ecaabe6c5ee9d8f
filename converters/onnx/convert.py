"""HF checkpoint → ONNX decoder with KV cache, built node by node on onnxruntime's contrib ops.

Why our own graph rather than onnxruntime-genai's model builder: the kernels are the same (GroupQueryAttention
with RoPE in the kernel and the KV cache grown in place, MatMulNBits, SkipSimplifiedLayerNormalization), but
- every weight comes from `source.tensor()` (LoRA merged, streamed into the external-data file one tensor at a
  time), so the export never holds the model twice;
- a precision plan chooses int4/int8/fp16/fp32 per HF tensor, and the written types are read back by HF name;
- integer weights are rounded by GPTQ (`edgeq.quant.gptq`) on calibration text, which is what pays for a 4-bit
  lm_head (rounded alone it stays 8-bit); decode is memory bound, so those bytes are its speed;
- a `logits_to_keep` input computes the vocabulary-wide lm_head for the last position only during prefill.
bench/README.md has the measured quality and speed against the builder and llama.cpp.
The graph itself, and its interface, is `edgeq.converters.onnx.graph`.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import onnx

from edgeq.errors import EdgeqError
from edgeq.formats import warn_mismatches
from edgeq.intake import SourceModel

from .spec import BLOCK_SIZES, HALF_PEAK, INT4_BLOCKS, INT8_BLOCK, ONNX, TABLE_INT8_BLOCK, int4_block, type_bits
from .blocks import BlockGrid, HalfBlockGrid, Quantized
from .graph import DATA_FILE, HEAD, TABLE, DecoderGraph, matrix_shape
from .weights import read_back
from edgeq.quant.effort import BY_GPTQ
from edgeq.quant.rotation import head_mix

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
ORT_FILE = "model.ort"
OPS_CONFIG = "required_operators.config"
ORT_FORMAT_LIMIT = 2 << 30  # an .ort file is one flatbuffer, which cannot pass 2 GiB


# INT4's default when GPTQ rounds it: a recipe, as llama.cpp's Q4_K_M is one, that lands below llama.cpp Q4_0's bytes.
# The attention's k/v/o projections at INT8 (small under grouped-query attention; 4 bits hurt them most), down_proj in
# blocks of 16, and the embedding table at INT4: in blocks of 128 for an untied lookup, of 16 for a table the head
# reads too. bench/README.md has what each step bought on SmolLM2-135M and Qwen2.5-Coder-0.5B.
RECIPE_INT8 = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight")
RECIPE_FINE = ("mlp.down_proj.weight",)
RECIPE_FINE_TYPE = "int4-block16"
RECIPE_TABLE = {True: "int4-block16", False: "int4-block128"}  # tied → its type


def plan_precisions(source: SourceModel, precision: str, overrides: dict[str, str] | None, gptq: bool = False,
                    block_size: int | None = None) -> dict[str, str]:
    """HF weight name → encoding for every matrix. INT4 without GPTQ keeps the embedding table and the lm_head at INT8:
    rounded alone, a 4-bit lm_head costs SmolLM2 +0.055 KL (llama.cpp keeps its output at 6 bits). With GPTQ the head
    costs +0.014 at 4 bits, and its bytes are what a decode step reads most, so INT4 is the recipe above (`RECIPE_*`;
    without its blocks of 16 when a block size is asked). A tied table is stored once for both (`shares_table`)."""
    shapes = source.shapes()
    names = [n for n, s in shapes.items() if len(s) == 2]
    tied = HEAD not in shapes
    if tied:
        names.append(HEAD)  # written from the embedding, and planned with it
    plan = dict.fromkeys(names, precision)
    if precision == "int4" and not gptq:
        plan.update(dict.fromkeys((HEAD, TABLE), "int8"))
    elif precision == "int4":
        plan.update(_recipe(names, shapes, tied, block_size))
    checked = ONNX.check_overrides(overrides, list(plan), shapes)
    plan.update(checked)
    if tied and len({TABLE, HEAD} & set(checked)) == 1:  # one stored table (`shares_table`): an integer type for it names both
        asked = TABLE if TABLE in checked else HEAD
        if type_bits(checked[asked]):
            plan[TABLE] = plan[HEAD] = checked[asked]
    return plan


def _recipe(names: list[str], shapes: dict, tied: bool, block_size: int | None) -> dict[str, str]:
    """The INT4 recipe's types where they differ from plain int4 (a block that does not divide a width is left out)."""
    table = RECIPE_TABLE[tied]
    width = matrix_shape(shapes, TABLE)[1]
    types = dict.fromkeys((TABLE, HEAD) if tied else (TABLE,), table if width % INT4_BLOCKS[table] == 0 else "int8")
    for name in names:
        if name.endswith(RECIPE_INT8):
            types[name] = "int8"
        elif name.endswith(RECIPE_FINE) and block_size is None and matrix_shape(shapes, name)[1] % INT4_BLOCKS[RECIPE_FINE_TYPE] == 0:
            types[name] = RECIPE_FINE_TYPE
    return types


def half_scaled(plan: dict[str, str], peaks: dict[str, float] | None) -> dict[str, int]:
    """The integer weights stored with float16 scales, each with the power of two its input is divided by: MatMulNBits
    then computes in float16, and a layer whose calibration activations (in or out) reach `HALF_PEAK` computes on
    them scaled down (exactly, by a power of two) and scaled back up in float32. None without calibration to measure
    them on: float32 scales everywhere."""
    if peaks is None:
        return {}
    shifts = {n: 0 if peaks.get(n, 0.0) < HALF_PEAK else math.floor(math.log2(peaks[n] / HALF_PEAK)) + 1
              for n, kind in plan.items() if type_bits(kind) and n != TABLE}
    if type_bits(plan.get(TABLE, "")):
        shifts[TABLE] = 0  # a lookup's rows are weights, always small (a tied table is the head's: no input to scale)
    return shifts


def block_sizes(plan: dict[str, str], shapes: dict[str, tuple], block_size: int | None, half: dict[str, int]) -> dict[str, int]:
    """The block of every integer matrix: INT8 blocks of 32 (Q8_0's layout), 64 for the embedding table and a tied head
    reading it; INT4 the block its type names (`int4-block64`), else the block asked, which must divide every INT4 width,
    or without one 32 (float16 scales) or 64 (float32) where it divides and the next size that does elsewhere."""
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise EdgeqError(f"INT4 block size {block_size} is not supported; choose one of {', '.join(map(str, BLOCK_SIZES))}")
    blocks = {}
    for name, kind in plan.items():
        width = matrix_shape(shapes, name)[1]
        if kind == "int8":
            table = name == TABLE or (name == HEAD and HEAD not in shapes)
            blocks[name] = TABLE_INT8_BLOCK if table and width % TABLE_INT8_BLOCK == 0 else INT8_BLOCK
        elif kind in INT4_BLOCKS:
            blocks[name] = INT4_BLOCKS[kind]
            if width % blocks[name]:
                raise EdgeqError(f"{kind} does not divide the width {width} of {name}; plan it at another block or at int8")
        elif kind == "int4":
            blocks[name] = int4_block(width, block_size, name in half)
            if blocks[name] is None:
                fits = [b for b in BLOCK_SIZES if width % b == 0]
                asked = f"INT4 block size {block_size} does not divide" if block_size else "no INT4 block size divides"
                raise EdgeqError(f"{asked} the width {width} of {name}; "
                                 f"use block size {' or '.join(map(str, fits)) or '(none fits)'}, or keep that layer at int8 in the plan")
    return blocks


def tied_through_mix(source: SourceModel) -> tuple[SourceModel, np.ndarray | None]:
    """A rotated checkpoint whose head is its embedding times a mix (`edgeq.quant.rotation.head_mix`), seen as tied, and
    the mix: the graph multiplies by it before the head and stores one table, as for any tied model."""
    mix = head_mix(source)
    if mix is None:
        return source, None
    view = copy.copy(source)
    view.index = {name: info for name, info in source.index.items() if name != HEAD}
    return view, mix


def gptq_rounding(calibration, plan: dict[str, str], blocks: dict[str, int], half: dict[str, int], progress: bool | None,
                  adapters=None, learned: bool = False, mix: np.ndarray | None = None) -> dict[str, Quantized]:
    """Every MatMulNBits weight of the plan but the embedding (a lookup: no inputs to compensate), rounded by GPTQ on the
    calibration text. A head read through a `mix` is the one stored table: it is rounded for the head's input times the
    mix (the lookup reads the same codes; its share of the error is a tenth of the head's on SmolLM2, bench/README.md).

    With `adapters` kept apart (`KeptAdapter`s), the one base serves each of them too, on activations its own
    calibration never produces: GPTQ compensates for the base's stream and every adapter's (`quantize_model`'s variants)."""
    from edgeq.quant.effort import require_tokens
    from edgeq.quant.gptq import quantize_model

    grids = {name: (HalfBlockGrid if name in half else BlockGrid)(type_bits(kind), blocks[name]) for name, kind in plan.items()
             if type_bits(kind) and name != TABLE}
    if grids:
        require_tokens(calibration, "max" if learned else "standard")
    return quantize_model(calibration.model, calibration.windows, grids, progress, variants=adapters or (),
                          gains=calibration.gptq_gains, learned=learned, head_mix=mix) if grids else {}


def _is_function(node: onnx.NodeProto, opsets: dict[str, int]) -> bool:
    """ONNX functions (Swish, CastLike, …) have a body onnxruntime inlines, so they need no kernel of their own."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain, 1), node.domain)
    except onnx.defs.SchemaError:
        return False
    return schema.has_function or schema.has_context_dependent_function


def check_operators(model: onnx.ModelProto) -> None:
    """Fails with the op's name when this onnxruntime has no CPU kernel for a node (before anyone loads the model)."""
    from onnxruntime.capi import _pybind_state as ort_state

    kernels = {(k.domain or "ai.onnx", k.op_name) for k in ort_state.get_all_opkernel_def() if k.provider == "CPUExecutionProvider"}
    opsets = {o.domain: o.version for o in model.opset_import}
    for node in model.graph.node:
        if (node.domain or "ai.onnx", node.op_type) not in kernels and not _is_function(node, opsets):
            raise EdgeqError(f"onnxruntime {ort_version()} has no CPU kernel for {node.op_type} ({node.domain or 'ai.onnx'}); "
                             "upgrade onnxruntime (pip install -U onnxruntime) or export another precision")


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def write_ort_format(stage: Path) -> list[str]:
    """`--mobile`: the ORT-format model ONNX Runtime Mobile loads, and the operator list a reduced build needs."""
    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    if (stage / DATA_FILE).stat().st_size > ORT_FORMAT_LIMIT:
        raise EdgeqError("the model is over 2 GiB, which the ORT format (one flatbuffer) cannot hold; export int4 or a smaller model for --mobile")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(stage / ORT_FILE)
    options.add_session_config_entry("session.save_model_format", "ORT")
    # NCHWc layouts are x86-only; leaving them out keeps the .ort file portable to ARM phones.
    ort.InferenceSession(str(stage / MODEL_FILE), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
    config = stage / OPS_CONFIG
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # it logs each file it writes at INFO
    create_config_from_models([stage / ORT_FILE], config, enable_type_reduction=False)
    config.write_text(config.read_text().replace(f"{stage}/", ""))  # the header names the model; not the staging folder
    return [ORT_FILE, OPS_CONFIG]


class ONNXConverter:
    """`edgeq export --format onnx`: fp32/fp16 baselines, int8 and int4 (MatMulNBits) weights, optional ORT format."""

    spec = ONNX

    def convert(self, source: SourceModel, stage: Path, *, precision: str, overrides: dict[str, str] | None = None,
                calibration=None, progress: bool | None = None,
                rounding: str = "gptq", block_size: int | None = None, accuracy_level: int = 4, mobile: bool = False,
                adapters=None) -> dict:
        """`block_size` is the INT4 block (16-256; default 64 where it divides, see `block_sizes`); `accuracy_level`
        4 lets MatMulNBits multiply in int8, 1 in fp32.
        `rounding` "gptq" (needs `calibration`) rounds every integer MatMulNBits weight by GPTQ on its text; "nearest"
        rounds each block to its nearest levels (weighted by the calibration's importance matrix when it has one).
        `adapters` (`edgeq.adapter_set.KeptAdapter`s) get LoRA inputs in the graph and an onnxruntime adapter file each."""
        precision = self.spec.normalize(precision)
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise EdgeqError(f"accuracy level {accuracy_level} is not one of 0-4 (MatMulNBits' compute type; 4 = int8, 1 = fp32)")
        if rounding not in self.spec.roundings:
            raise EdgeqError(f"rounding {rounding!r} is not one of {', '.join(self.spec.roundings)}")
        use_gptq = rounding in BY_GPTQ and calibration is not None
        tied, mix = tied_through_mix(source)
        plan = plan_precisions(tied, precision, overrides, gptq=use_gptq, block_size=block_size)
        if mix is not None and plan[HEAD] == plan[TABLE] and type_bits(plan[HEAD]):
            source = tied
        elif mix is not None:  # a plan that types the head apart: the rotated head is its own tensor, rounded by GPTQ
            mix, plan = None, plan_precisions(source, precision, overrides, gptq=use_gptq, block_size=block_size)
        integer = any(type_bits(kind) for kind in plan.values())
        measured = integer and calibration is not None and (use_gptq or calibration.given)
        half = half_scaled(plan, calibration.activation_peaks(keep_loaded=use_gptq) if measured else None)
        blocks = block_sizes(plan, source.shapes(), block_size, half)
        rounded = gptq_rounding(calibration, plan, blocks, half, progress, adapters, rounding == "learned", mix) if use_gptq and integer else None
        importance = calibration.importance(progress) if integer and not use_gptq and calibration is not None else None
        if importance and mix is not None:
            importance = {n: v for n, v in importance.items() if n != HEAD}  # measured on the head's input, not the mix's output
        slots = None
        if adapters:
            from .adapters import LoraSlots

            slots = LoraSlots(adapters, source.shapes())
        model = DecoderGraph(source, stage, plan, blocks, accuracy_level, importance, rounded, slots, half, mix).build(progress)
        check_operators(model)
        onnx.save_model(model, str(stage / MODEL_FILE))
        try:
            onnx.checker.check_model(str(stage / MODEL_FILE))
        except onnx.checker.ValidationError as exc:
            raise EdgeqError(f"internal: the ONNX graph edgeq wrote does not validate ({str(exc).splitlines()[0]}); please report it") from exc
        extra = write_ort_format(stage) if mobile else []
        report = read_back(stage / MODEL_FILE, plan)
        warn_mismatches(log, report["mismatches"])
        int4_blocks = sorted({blocks[n] for n, kind in plan.items() if type_bits(kind) == 4})
        if adapters:
            from .adapters import write_adapter

            report["adapters"] = [{**adapter.record(), **write_adapter(adapter, stage)} for adapter in adapters]
        return {"model_file": MODEL_FILE, "precision": precision, "block_size": int4_blocks[0] if len(int4_blocks) == 1 else int4_blocks or None,
                "rounding": ((rounding if use_gptq else "gptq") if rounded else "importance-weighted" if importance else "nearest") if integer else None,
                "accuracy_level": accuracy_level, "mobile_files": extra, **report}
