"""Reading an edgeq `.mlpackage` back, on any OS: functions, inputs, outputs, states, and every weight
as stored (type, bytes) or dequantized to float32.

Core ML only predicts on Apple platforms, but the package is a protobuf spec plus a weight file
that coremltools parses anywhere; the compressed weights are `constexpr_*` ops of the MIL program
whose dense value coremltools can compute. Weight ops keep the HF parameter name with dots turned
into underscores (`model_layers_3_mlp_down_proj_weight…`), which is how they map back.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.formats import readback

from .coreml_format import INT4_BLOCKS

WEIGHT_NAME = re.compile(r"^(.*?_(?:weight|bias))(?:_|$)")


def load_program(path: Path):
    """(spec, MIL program) of a package, without compiling or loading it into Core ML."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        return spec, milproto_load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    except Exception as exc:  # coremltools raises many types for a damaged package
        raise EdgeqError(f"{path} is not a readable Core ML package ({exc}); re-export the bundle") from exc


def _is_weight_op(op) -> bool:
    return op.op_type == "const" or op.op_type.startswith("constexpr_")


def weight_ops(function, names: list[str]) -> dict[str, object]:
    """HF name → the op that yields that weight: the last op of a decompression chain, or the const. The names keep
    their dots until coremltools' ML program backend makes them identifiers."""
    wanted = {name.replace(".", "_"): name for name in names}
    found = {}
    for op in function.operations:
        if not _is_weight_op(op) or any(_is_weight_op(child) for child in op.outputs[0].child_ops):
            continue  # not a weight, or only an input (data, scale, LUT) of a decompression op
        match = WEIGHT_NAME.match(op.name.replace(".", "_"))
        if match and match.group(1) in wanted:
            found[wanted[match.group(1)]] = op
    return found


def _inputs(op) -> list:
    """The const leaves a weight is decompressed from."""
    if op.op_type == "const":
        return [op.outputs[0]]
    leaves = []
    for var in op.inputs.values():
        if var.op is not None and _is_weight_op(var.op):
            leaves.extend(_inputs(var.op))
    return leaves


def _bytes(var) -> int:
    numel = int(np.prod(var.shape)) if var.shape else 1
    return -(-numel * var.dtype.get_bitwidth() // 8)


def stored_type(op) -> str:
    """`fp16`, `int8` (per channel), `int4` (blocks of 32 inputs) or `int4-block16|64|128`,
    `palettize4`/`palettize6`, or a spelled-out variant (`int8-block32`) of a layout edgeq never asks for."""
    from coremltools.converters.mil.mil import types

    kind = op.op_type
    if kind == "const":
        return types.builtin_to_string(op.outputs[0].dtype)
    if kind == "constexpr_blockwise_shift_scale":
        bits = op.data.dtype.get_bitwidth()
        width, groups = op.data.shape[-1], op.scale.shape[-1]
        if (bits, groups) == (8, 1) or (bits, width // groups) == (4, 32):
            return f"int{bits}"
        return f"int{bits}-{'channel' if groups == 1 else f'block{width // groups}'}"
    if kind == "constexpr_lut_to_dense":
        return f"palettize{op.indices.dtype.get_bitwidth()}"
    return kind


def dense(op) -> np.ndarray:
    """The weight as the device will see it after decompression, as float32."""
    value = op.outputs[0].val if op.op_type == "const" else op.materialized_val_inference()
    return np.asarray(value, dtype=np.float32)


def _io(features) -> dict:
    out = {}
    for feature in features:
        kind = feature.type.WhichOneof("Type")
        array = feature.type.stateType.arrayType if kind == "stateType" else feature.type.multiArrayType
        dtype = type(array).ArrayDataType.Name(array.dataType)
        out[feature.name] = {"shape": [int(d) for d in array.shape], "dtype": dtype.lower()}
    return out


def structure(spec) -> dict:
    """Functions with their inputs, outputs and states, as written in the spec."""
    functions = {
        f.name: {"inputs": _io(f.input), "outputs": _io(f.output), "states": _io(f.state)}
        for f in spec.description.functions
    }
    return {"functions": functions, "default_function": spec.description.defaultFunctionName,
            "specification_version": spec.specificationVersion}


def describe(path: Path, shapes: dict[str, tuple], plan: dict[str, str]) -> dict:
    """Manifest fields read back from the package: tensor types and bytes, real bits per weight,
    every weight that differs from the plan, and the package's structure."""
    spec, program = load_program(path)
    default = spec.description.defaultFunctionName or next(iter(program.functions))
    ops = weight_ops(program.functions[default], list(shapes))
    tensors, mismatches = {}, []
    for name, op in ops.items():
        nbytes = sum(_bytes(var) for var in _inputs(op))
        tensors[name] = {"type": stored_type(op), "shape": list(shapes[name]), "bytes": nbytes, "op": op.name}
    for name, asked in plan.items():
        got = tensors.get(name, {}).get("type", "missing")
        if got != asked:
            width, block = shapes[name][-1], INT4_BLOCKS.get(asked)
            why = (f"input width {width} is not a multiple of {block}" if block and width % block
                   else "left as it was (the export log says why)")
            mismatches.append({"tensor": name, "asked": asked, "got": got, "why": why})
    weights_file = Path(path) / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    return {
        **readback(tensors, mismatches),
        "coreml": {**structure(spec), "weight_file_bytes": weights_file.stat().st_size if weights_file.is_file() else 0},
    }


def read_weights(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Dequantized float32 weights of the package's default function, by HF name (those it stores)."""
    spec, program = load_program(path)
    default = spec.description.defaultFunctionName or next(iter(program.functions))
    return {name: dense(op) for name, op in weight_ops(program.functions[default], names).items()}
