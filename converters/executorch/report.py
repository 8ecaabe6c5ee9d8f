"""What the written `.pte` holds, read back from the file: each linear layer's stored type (XNNPACK's own graph of each
delegate, decoded by the flatc ExecuTorch ships), bytes per weight, and what runs outside the delegate.

A fully-connected node's filter names its type (`qbint4`: int4 in groups, whose size it states; `qcint8`: int8 per
channel; `fp32`) and its constant data (codes and scales, by key in the program's named data, so their bytes are the
file's). Filters are matched to HF weight names by shape in the order the decoder calls its linears; anything else
(a count or shape that does not line up, a type other than the plan's) is a mismatch in the manifest.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from edgeq.formats import readback

from .layouts import LINEARS

XNN_TYPES = {"xnn_datatype_qbint4": 4, "xnn_datatype_qcint4": 4, "xnn_datatype_qcint8": 8, "xnn_datatype_fp32": 32}
GLUE = {"getitem", "alloc", "sym_size", "_local_scalar_dense", "_assert_scalar", "executorch_call_delegate"}


def _xnn_graphs(data: bytes):
    """(XNNGraph as a dict, named data key → bytes) of every XNNPACK delegate of the program, in execution order."""
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader, _get_schema_bytes
    from executorch.exir._serialize._flatbuffer import _flatc_decompile
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(data)
    named = {}
    if pte.named_data is not None:
        named = {key: len(pte.named_data.buffers[entry.buffer_index]) for key, entry in pte.named_data.pte_data.items()}
    graphs = []
    with tempfile.TemporaryDirectory() as work:
        schema = Path(work) / "schema.fbs"
        schema.write_bytes(_get_schema_bytes())
        for plan in pte.program.execution_plan:
            for delegate in plan.delegates:
                if delegate.id != "XnnpackBackend":
                    continue
                payload = pte.program.backend_delegate_data[delegate.processed.index].data
                header = XNNHeader.from_bytes(payload[:XNNHeader.EXPECTED_LENGTH])
                binary = Path(work) / "graph.bin"
                binary.write_bytes(payload[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size])
                _flatc_decompile(work, str(schema), str(binary), ["--raw-binary"])
                graphs.append(json.loads((Path(work) / "graph.json").read_text()))
    return graphs, named


def _filters(graphs, named: dict) -> list[dict]:
    """Each fully-connected node's filter: type, (rows, cols), group, bytes of codes and scales in the file."""
    found = []
    for graph in graphs:
        values, constants = graph["xvalues"], graph.get("constant_data") or []

        def nbytes(index):
            entry = constants[index] if 0 < index < len(constants) else None
            return 0 if entry is None else named.get(entry.get("named_key"), entry.get("size", 0))

        for node in graph["xnodes"]:
            if node["xnode_union_type"] != "XNNFullyConnected":
                continue
            value = values[node["xnode_union"]["filter_id"]]
            quantized = value["xvalue_union_type"] == "XNNQuantizedTensorValue"
            tensor = value["xvalue_union"]["tensor_value"] if quantized else value["xvalue_union"]
            params = value["xvalue_union"].get("quant_params") or {} if quantized else {}
            size = nbytes(tensor["constant_buffer_idx"]) + nbytes(params.get("scale_buffer_idx", 0))
            found.append({"type": tensor["datatype"], "shape": tuple(tensor["dims"]), "group": params.get("group_size", 0),
                          "bytes": size})
    return found


def _expected_type(precision: str) -> tuple[str, int]:
    if precision == "fp32":
        return "xnn_datatype_fp32", 0
    linear = LINEARS[precision]
    return ("xnn_datatype_qbint4", linear.group) if linear.bits == 4 else ("xnn_datatype_qcint8", 0)


def _name(datatype: str, group: int) -> str:
    short = datatype.removeprefix("xnn_datatype_")
    return f"{short}-g{group}" if group else short


def read_back(path: Path, edge, plan: dict[str, str], kept: dict[str, str], shapes: dict, spec, order: list[str]) -> dict:
    """The manifest fields from the written file: per-tensor stored type and bytes, mismatches against the plan, and
    what the program runs outside XNNPACK. `order`: the linears' HF weight names in the order the program calls them."""
    graphs, named = _xnn_graphs(path.read_bytes())
    filters = _filters(graphs, named)
    tensors, mismatches, unused = {}, [], list(filters)
    for name in order:
        shape = tuple(shapes.get(name) or shapes["model.embed_tokens.weight"])
        match = next((f for f in unused if f["shape"] == shape), None)
        asked = plan[name]
        if match is None:
            mismatches.append({"tensor": name, "asked": asked, "got": "not in XNNPACK", "why": "no fully-connected filter of its shape"})
            continue
        unused.remove(match)
        want = _expected_type("fp32" if name in kept else asked)
        got = _name(match["type"], match["group"])
        tensors[name] = {"type": got, "shape": list(shape), "bytes": match["bytes"]}
        if (match["type"], match["group"]) != want:
            mismatches.append({"tensor": name, "asked": asked, "got": got, "why": kept.get(name, "the delegate stored another type")})
        elif name in kept:
            mismatches.append({"tensor": name, "asked": asked, "got": got, "why": kept[name]})
    fields = readback(tensors, mismatches)
    fields["executorch"] = {"delegation": delegation(edge, spec), "file_bytes": path.stat().st_size,
                            "xnnpack_delegates": len(graphs)}
    return fields


def delegation(edge, spec) -> dict:
    """Ops outside XNNPACK (by kind, with counts) and the share of a decode token's flops inside it, at a cache half full:
    the linears (all of which XNNPACK runs here) against them plus attention (ExecuTorch's custom sdpa kernel)."""
    outside = Counter()
    for node in edge.exported_program().graph.nodes:
        if node.op == "call_function":
            name = str(getattr(node.target, "__name__", node.target)).split("::")[-1].split(".")[0].removeprefix("aten_")
            if name not in GLUE:
                outside[name] += 1
    linear_flops = 2 * sum(int(np.prod(s)) for n, s in spec_linear_shapes(spec).items())
    attention_flops = 4 * spec.layers * spec.heads * spec.head_dim * (spec.context // 2)
    return {"outside_xnnpack": dict(sorted(outside.items())),
            "flops_share_in_xnnpack": round(linear_flops / (linear_flops + attention_flops), 4),
            "flops_note": "per decode token at half the context: linears in XNNPACK; attention in ExecuTorch's custom sdpa kernel"}


def spec_linear_shapes(spec) -> dict[str, tuple[int, int]]:
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    per_layer = {"q": (q, spec.hidden), "k": (kv, spec.hidden), "v": (kv, spec.hidden), "o": (spec.hidden, q),
                 "gate": (spec.intermediate, spec.hidden), "up": (spec.intermediate, spec.hidden), "down": (spec.hidden, spec.intermediate)}
    shapes = {f"{i}.{k}": s for i in range(spec.layers) for k, s in per_layer.items()}
    shapes["head"] = (spec.vocab, spec.hidden)
    return shapes
