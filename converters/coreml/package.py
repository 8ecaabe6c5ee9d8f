"""Reading an edgeq `.mlpackage` back, on any OS: functions, inputs, outputs, states, and every weight
as stored (type, bytes) or dequantized to float32.

Core ML only predicts on Apple platforms, but the package is a protobuf spec plus a weight file
that coremltools parses anywhere; the compressed weights are `constexpr_*` ops of the MIL program
whose dense value coremltools can compute. Weight ops keep the HF parameter name with dots turned
into underscores (`model_layers_3_mlp_down_proj_weight…`), which is how they map back.

Describing a package reads its spec alone: the type and shape of every constant are written there beside the
reference into the weight file, so the stored types and bytes need none of the weights coremltools' program loader
reads into numpy (~8.6 GB at 3B). Reading values (`read_weights`) loads the program.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.formats import readback

from .spec import INT4_BLOCKS

WEIGHT_NAME = re.compile(r"^(.*?_(?:weight|bias))(?:_|$)")


@contextmanager
def _reading(path: Path):
    try:
        yield
    except Exception as exc:  # coremltools raises many types for a damaged package
        raise EdgeqError(f"{path} is not a readable Core ML package ({exc}); re-export the bundle") from exc


def load_program(path: Path):
    """(spec, MIL program) of a package, without compiling or loading it into Core ML: every weight read into numpy."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    with _reading(path):
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        return spec, milproto_load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)


def read_spec(path: Path):
    """The package's protobuf spec alone: what `spec_function` views without reading a weight."""
    from coremltools.models.utils import load_spec

    with _reading(path):
        return load_spec(str(path))


def _default(spec) -> str:
    return spec.description.defaultFunctionName or next(iter(spec.mlProgram.functions))


def _is_weight(op_type: str) -> bool:
    return op_type == "const" or op_type.startswith("constexpr_")


def _spec_op(op_type: str, name: str, value_types: list) -> SimpleNamespace:
    """As much of the MIL op `load_program` makes as `weight_ops`, `_inputs`, `stored_type` and `_bytes` read: type,
    name, inputs and outputs with their dtype, shape, producer and consumers."""
    from coremltools.converters.mil.mil import types

    op = SimpleNamespace(op_type=op_type, name=name, inputs={})
    op.outputs = [SimpleNamespace(dtype=types.PROTO_TO_BUILTIN_TYPE[t.tensorType.dataType], op=op, child_ops=[],
                                  shape=tuple(d.constant.size for d in t.tensorType.dimensions)) for t in value_types]
    return op


def spec_function(function) -> SimpleNamespace:
    """The const and constexpr ops of a spec function, wired to one another, as `weight_ops` reads a MIL function:
    types and shapes only, no weight read. A value bound inline is a const of its own, as coremltools' loader makes it."""
    outputs, operations = {}, []
    for spec in function.block_specializations[function.opset].operations:
        if not _is_weight(spec.type):
            continue
        op = _spec_op(spec.type, spec.attributes["name"].immediateValue.tensor.strings.values[0], [o.type for o in spec.outputs])
        for key, argument in spec.inputs.items():
            binding = argument.arguments[0]
            var = (outputs.get(binding.name) if binding.WhichOneof("binding") == "name"
                   else _spec_op("const", "", [binding.value.type]).outputs[0])
            if var is not None:
                op.inputs[key] = var
                var.child_ops.append(op)
        outputs.update(zip((o.name for o in spec.outputs), op.outputs))
        operations.append(op)
    return SimpleNamespace(operations=operations)


def weight_ops(function, names: list[str]) -> dict[str, object]:
    """HF name → the op that yields that weight: the last op of a decompression chain, or the const. The names keep
    their dots until coremltools' ML program backend makes them identifiers. `function`: a MIL function or the
    typed view `spec_function` makes of a spec's."""
    wanted = {name.replace(".", "_"): name for name in names}
    found = {}
    for op in function.operations:
        if not _is_weight(op.op_type) or any(_is_weight(child.op_type) for child in op.outputs[0].child_ops):
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
        if var.op is not None and _is_weight(var.op.op_type):
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
        data, scale = op.inputs["data"], op.inputs["scale"]
        bits = data.dtype.get_bitwidth()
        width, groups = data.shape[-1], scale.shape[-1]
        if (bits, groups) == (8, 1) or (bits, width // groups) == (4, 32):
            return f"int{bits}"
        return f"int{bits}-{'channel' if groups == 1 else f'block{width // groups}'}"
    if kind == "constexpr_lut_to_dense":
        return f"palettize{op.inputs['indices'].dtype.get_bitwidth()}"
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
    every weight that differs from the plan, and the package's structure. From the spec alone: no weight is read."""
    spec = read_spec(path)
    with _reading(path):
        ops = weight_ops(spec_function(spec.mlProgram.functions[_default(spec)]), list(shapes))
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
    return {name: dense(op) for name, op in weight_ops(program.functions[_default(spec)], names).items()}
