"""LoRA adapters kept apart from an ONNX base: LoRA inputs in the graph, one onnxruntime adapter file per adapter.

Every weight any kept adapter adapts gets two overridable initializers in the base graph, `<module>.lora_A`
(in × rank) and `<module>.lora_B` (rank × out), and its output gains x·A·B. Their defaults are zero (rank 1), so
the base alone computes exactly what it would without them. Each adapter is an onnxruntime adapter file
(`onnxruntime.AdapterFormat`, `.onnx_adapter`) holding its A and B (scaling folded into B) under those names:
onnxruntime feeds them when a run names the adapter (`RunOptions.add_active_adapter`), and edgeq's engine,
which runs with IO binding, binds them as inputs; a slot the adapter does not use keeps its zero default.
Ranks are symbolic per slot, so adapters of different ranks share one graph.

Weights the graph multiplies as one packed kernel (q/k/v, gate/up) get slots together: the deltas are
concatenated like the packed outputs. An embedding LoRA gathers rows of A by token id, as the embedding does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgeq.adapter_set import KeptAdapter

ADAPTER_DIR = "adapters"
SUFFIX = ".onnx_adapter"
EMBEDDING = "model.embed_tokens.weight"
PACKED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # weights the graph may multiply as one kernel


def slot_names(weight: str) -> tuple[str, str]:
    module = weight.removesuffix(".weight")
    return f"{module}.lora_A", f"{module}.lora_B"


class LoraSlots:
    """The LoRA inputs of one base graph: the union of what the kept adapters adapt (and their packed siblings)."""

    def __init__(self, adapters: list[KeptAdapter], shapes: dict[str, tuple]):
        self.shapes = shapes
        self.weights: set[str] = set()
        for adapter in adapters:
            for weight in adapter.targets():
                self.weights.add(weight)
                prefix, _, leaf = weight.removesuffix(".weight").rpartition(".")
                for group in PACKED:
                    if leaf in group:
                        self.weights.update(f"{prefix}.{sibling}.weight" for sibling in group if f"{prefix}.{sibling}.weight" in shapes)
        self.inputs: list = []

    def covers(self, names: list[str]) -> bool:
        return any(name in self.weights for name in names)

    def _slot(self, graph, weight: str) -> tuple[str, str]:
        """Declares the two inputs of `weight` (zero defaults of rank 1) and returns their names."""
        rows, cols = self.shapes.get(weight) or self.shapes[EMBEDDING]
        a_name, b_name = slot_names(weight)
        rank = f"{a_name}.rank"
        first = rows if weight == EMBEDDING else cols  # an embedding gathers A's rows by token id
        second = cols if weight == EMBEDDING else rows
        for name, shape, dims in ((a_name, (first, 1), [first, rank]), (b_name, (1, second), [rank, second])):
            graph.initializers.append(numpy_helper.from_array(np.zeros(shape, dtype=np.float32), name))
            self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        return a_name, b_name

    def delta(self, graph, x: str, weight: str) -> str:
        """x·A·B of `weight`'s slot (for the embedding, `x` is the token ids and A's rows are gathered)."""
        a, b = self._slot(graph, weight)
        low = graph.node("Gather", [a, x], axis=0) if weight == EMBEDDING else graph.node("MatMul", [x, a])
        return graph.node("MatMul", [low, b])

    def add(self, graph, x: str, names: list[str], out: str) -> str:
        """`out` (the outputs of `names`, side by side when packed) plus their LoRA deltas."""
        if not self.covers(names):
            return out
        deltas = [self.delta(graph, x, name) for name in names]
        return graph.node("Add", [out, deltas[0] if len(deltas) == 1 else graph.node("Concat", deltas, axis=-1)])


def adapter_tensors(adapter: KeptAdapter) -> dict[str, np.ndarray]:
    """The adapter's slot values, float32, scaling folded into B."""
    tensors = {}
    for weight in adapter.targets():
        b, a, scaling = adapter.factors(weight)
        a_name, b_name = slot_names(weight)
        if weight == EMBEDDING:  # rows gathered by token: B' (vocab × r), then A' (r × hidden)
            tensors[a_name], tensors[b_name] = b.numpy(), (a * scaling).numpy()
        else:
            tensors[a_name], tensors[b_name] = a.T.contiguous().numpy(), (b * scaling).T.contiguous().numpy()
    return {name: np.ascontiguousarray(t, dtype=np.float32) for name, t in tensors.items()}


def write_adapter(adapter: KeptAdapter, stage: Path) -> dict:
    """Writes `adapters/<name>.onnx_adapter`; returns its manifest entry (file, dtype, bytes)."""
    import onnxruntime as ort

    (stage / ADAPTER_DIR).mkdir(exist_ok=True)
    file = f"{ADAPTER_DIR}/{adapter.name}{SUFFIX}"
    arrays = adapter_tensors(adapter)
    writer = ort.AdapterFormat()
    writer.set_adapter_version(1)
    writer.set_model_version(1)
    writer.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()})
    writer.export_adapter(str(stage / file))
    return {"file": file, "dtype": "fp32", "bytes": (stage / file).stat().st_size}
