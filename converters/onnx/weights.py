"""The ONNX export's streaming external-data writer and its read-back report.

Every weight is named after its Hugging Face tensor, so a precision plan (keyed by HF names) can be
checked against the written file: `read_back` rebuilds each tensor's type from the node that consumes
it (MatMulNBits bits/block_size, GatherBlockQuantized bits, float dtype), not from what was asked.

The codes themselves are made in `edgeq.converters.onnx.blocks`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeq.formats import readback

from .spec import ALIGN as _ALIGN, ALIGN_ABOVE as _ALIGN_ABOVE, INT4_BLOCKS


class ExternalData:
    """Appends tensors to one external-data file as they are made, so peak memory follows the largest tensor."""

    def __init__(self, folder: Path, filename: str):
        self.filename = filename
        self._file = open(folder / filename, "wb")
        self._offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes > _ALIGN_ABOVE:
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
        if node.op_type == "Reshape":  # a shared table's lookup reads the head's blocks through a Reshape
            continue
        for index, name in enumerate(node.input):
            if index < 2 or node.op_type != "MatMulNBits":  # MatMulNBits' scales belong to their weight
                consumers.setdefault(name, node)
    for node in model.graph.node:  # weights packed for one kernel (q/k/v, gate/up) belong to the Concat's consumer
        if node.op_type == "Concat" and node.output[0] in consumers:
            for name in node.input:
                consumers[name] = consumers[node.output[0]]
    companions = {t.name: _nbytes(t) for t in model.graph.initializer if t.name.endswith(".scales")}
    scale_types = {t.name: {TensorProto.FLOAT: "fp32", TensorProto.FLOAT16: "fp16"}.get(t.data_type)
                   for t in model.graph.initializer if t.name.endswith(".scales")}
    tensors, mismatches = {}, []
    for t in model.graph.initializer:
        if not t.name.endswith((".weight", ".bias")):
            continue
        info = _describe(t.name, t, consumers.get(t.name))
        info["bytes"] = _nbytes(t) + companions.get(f"{t.name}.scales", 0)
        if f"{t.name}.scales" in scale_types:
            info["scales"] = scale_types[f"{t.name}.scales"]
        tensors[t.name] = info
        asked = planned.get(t.name)
        if asked in INT4_BLOCKS and info["type"] == "int4" and info["block_size"] == INT4_BLOCKS[asked]:
            info["type"] = asked  # an int4 type named by its block, as the plan names it
        if asked and asked != info["type"]:
            mismatches.append({"tensor": t.name, "asked": asked, "got": info["type"], "why": "the writer did not apply the plan"})
    return readback(tensors, mismatches)
