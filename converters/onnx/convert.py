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

Graph interface (plain onnxruntime can run it): `input_ids` [batch, seq] int64, `attention_mask`
[batch, total] int64, `past_key_values.{i}.key|value` [batch, kv_heads, past, head_dim] float32,
`logits_to_keep` (int64 scalar: 0 = every position, 1 = the last) → `logits`, `present.{i}.key|value`.
A present buffer may be the same memory as its past buffer (sized for the whole context): then the
cache grows in place, which is how `edgeq.runtimes.ort` runs it. With LoRA adapters kept apart, the graph also
takes each adapted weight's `<module>.lora_A` / `.lora_B` (overridable, zero by default; `onnx_adapters.py`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeq.errors import EdgeqError
from edgeq.formats import warn_mismatches
from edgeq.intake import SourceModel
from edgeq.model_shape import ModelShape
from edgeq.progress import bar

from .spec import BLOCK_SIZES, INT_TYPES, INT8_BLOCK, ONNX, int4_block
from .weights import BlockGrid, ExternalData, Quantized, quantize_blocks, read_back

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ORT_FILE = "model.ort"
OPS_CONFIG = "required_operators.config"
OPSET = 23  # RMSNormalization is standard from 23
ORT_FORMAT_LIMIT = 2 << 30  # an .ort file is one flatbuffer, which cannot pass 2 GiB


def plan_precisions(source: SourceModel, precision: str, overrides: dict[str, str] | None, gptq: bool = False) -> dict[str, str]:
    """HF weight name → encoding for every matrix. INT4 keeps embeddings at INT8, and the lm_head too unless
    GPTQ rounds it: rounded alone, a 4-bit lm_head costs SmolLM2 +0.055 KL (llama.cpp keeps its output at 6 bits);
    with GPTQ +0.014, and its bytes are what a decode step reads most (4 bits decode as fast as the builder's)."""
    shapes = source.shapes()
    names = [n for n, s in shapes.items() if len(s) == 2]
    if "lm_head.weight" not in shapes:
        names.append("lm_head.weight")  # tied: written from the embedding, but planned on its own
    kept = ("model.embed_tokens.weight",) if gptq else ("lm_head.weight", "model.embed_tokens.weight")
    plan = {}
    for name in names:
        plan[name] = "int8" if precision == "int4" and name in kept else precision
    plan.update(ONNX.check_overrides(overrides, list(plan), shapes))
    return plan


def block_sizes(plan: dict[str, str], shapes: dict[str, tuple], block_size: int | None) -> dict[str, int]:
    """The block of every integer matrix: INT8 blocks of 32 (Q8_0's layout); INT4 the block asked, which must divide
    every INT4 width, or without one 64 where it divides and the next size that does elsewhere."""
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise EdgeqError(f"INT4 block size {block_size} is not supported; choose one of {', '.join(map(str, BLOCK_SIZES))}")
    blocks = {}
    for name, kind in plan.items():
        width = matrix_shape(shapes, name)[1]
        if kind == "int8":
            blocks[name] = INT8_BLOCK
        elif kind == "int4":
            blocks[name] = int4_block(width, block_size)
            if blocks[name] is None:
                fits = [b for b in BLOCK_SIZES if width % b == 0]
                asked = f"INT4 block size {block_size} does not divide" if block_size else "no INT4 block size divides"
                raise EdgeqError(f"{asked} the width {width} of {name}; "
                                 f"use block size {' or '.join(map(str, fits)) or '(none fits)'}, or keep that layer at int8 in the plan")
    return blocks


def matrix_shape(shapes: dict[str, tuple], name: str) -> tuple:
    """(rows, cols) of a planned matrix; a tied lm_head has the embedding's."""
    return tuple(shapes.get(name) or shapes["model.embed_tokens.weight"])


def gptq_rounding(calibration, plan: dict[str, str], blocks: dict[str, int], progress: bool | None,
                  adapters=None) -> dict[str, Quantized]:
    """Every MatMulNBits weight of the plan, rounded by GPTQ on the calibration text (the embedding is a lookup: no inputs to compensate).

    With `adapters` kept apart (`KeptAdapter`s), the one base serves each of them too, on activations its own
    calibration never produces: GPTQ compensates for the base's stream and every adapter's (`quantize_model`'s variants)."""
    from edgeq.quant.effort import require_tokens
    from edgeq.quant.gptq import quantize_model

    grids = {name: BlockGrid(int(kind[3:]), blocks[name]) for name, kind in plan.items()
             if kind in INT_TYPES and name != "model.embed_tokens.weight"}
    if grids:
        require_tokens(calibration)
    return quantize_model(calibration.model, calibration.windows, grids, progress, variants=adapters or ()) if grids else {}


class DecoderGraph:
    """Accumulates nodes and initializers; weights go straight to the external-data file."""

    def __init__(self, source: SourceModel, stage: Path, plan: dict[str, str], blocks: dict[str, int],
                 accuracy_level: int, importance: dict[str, np.ndarray] | None, rounded: dict[str, Quantized] | None = None,
                 lora=None):
        self.source, self.plan, self.blocks = source, plan, blocks
        self.lora = lora  # onnx_adapters.LoraSlots of the kept adapters, or None
        self.accuracy_level, self.importance = accuracy_level, importance or {}
        self.rounded = dict(rounded or {})  # GPTQ's result, taken (and dropped) as each weight is written
        self.data = ExternalData(stage, DATA_FILE)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self.shape = shape = ModelShape.from_config(source.config)
        self.hidden, self.layers, self.n_head, self.n_kv, self.head_dim = shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim
        self.eps = float(source.config["rms_norm_eps"])
        self.arch = source.arch  # the family's block: norm offset, sandwich norms, activation, fused projections
        self.rope_inputs: dict[int, tuple[str, str]] = {}  # id(Rope) → its cos/sin inputs of GroupQueryAttention

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> str | list[str]:
        name = f"/{op}_{len(self.nodes)}"
        outputs = [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0] if n_out == 1 else outputs

    def const(self, value, dtype=np.int64) -> str:
        key = (np.asarray(value).tobytes(), np.dtype(dtype).str, np.shape(value))
        if key not in self._consts:
            name = f"const/{len(self._consts)}"
            self.initializers.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
            self._consts[key] = name
        return self._consts[key]

    def _tensor(self, name: str):
        if name == "lm_head.weight" and name not in self.source.shapes():
            name = "model.embed_tokens.weight"
        return self.source.tensor(name).float()

    def add_weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.add(name, array))
        return name

    def _quantized(self, name: str) -> tuple[str, str, int, int, int, int]:
        """Writes `name` and its scales as the plan encodes them; returns (weight, scales, rows, cols, bits, block)."""
        q = self.rounded.pop(name, None)
        if q is None:
            q = quantize_blocks(self._tensor(name), int(self.plan[name][3:]), self.blocks[name], self.importance.get(name))
        self.add_weight(f"{name}.scales", q.scales)
        return self.add_weight(name, q.data), f"{name}.scales", *matrix_shape(self.source.shapes(), name), q.bits, q.block_size

    def _matmul_nbits(self, x: str, weight: str, scales: str, rows: int, cols: int, bits: int, block: int) -> str:
        return self.node("MatMulNBits", [x, weight, scales], domain="com.microsoft", K=cols, N=rows, bits=bits,
                         block_size=block, accuracy_level=self.accuracy_level)

    def _bias(self, out: str, bias: str | None) -> str:
        if bias and bias in self.source.shapes():
            return self.node("Add", [out, self.add_weight(bias, self._tensor(bias).numpy())])
        return out

    def _lora(self, x: str, names: list[str], out: str) -> str:
        return out if self.lora is None else self.lora.add(self, x, names, out)

    def linear(self, x: str, name: str, bias: str | None = None) -> str:
        kind = self.plan[name]
        if kind in ("int4", "int8"):
            return self._lora(x, [name], self._bias(self._matmul_nbits(x, *self._quantized(name)), bias))
        weight = self._tensor(name)
        if kind == "fp16":
            out = self.node("MatMul", [x, self.node("Cast", [self.add_weight(name, weight.T.half().numpy())], to=TensorProto.FLOAT)])
        else:
            out = self.node("MatMul", [x, self.add_weight(name, weight.T.contiguous().numpy())])
        return self._lora(x, [name], self._bias(out, bias))

    def packed(self, x: str, names: list[str], biases: list[str | None]) -> str | None:
        """`x` times several weights as one MatMulNBits over their Concat (onnxruntime folds it into one weight
        at load), outputs side by side; None unless the plan quantizes them alike. q/k/v are 192-576 rows each
        on small models, and one larger kernel decodes faster than three small ones. The file keeps one tensor
        per HF name."""
        kinds = {(self.plan[n], self.blocks.get(n)) for n in names}
        present = [b for b in biases if b and b in self.source.shapes()]
        if len(kinds) > 1 or next(iter(kinds))[0] not in INT_TYPES or 0 < len(present) < len(names):
            return None
        parts = [self._quantized(n) for n in names]
        weight = self.node("Concat", [p[0] for p in parts], axis=0)
        scales = self.node("Concat", [p[1] for p in parts], axis=0)
        out = self._lora(x, names, self._matmul_nbits(x, weight, scales, sum(p[2] for p in parts), *parts[0][3:]))
        if not present:
            return out
        return self.node("Add", [out, self.node("Concat", [self.add_weight(b, self._tensor(b).numpy()) for b in present], axis=0)])

    def linears(self, x: str, names: list[str], biases: list[str | None]) -> list[str]:
        """`x` times several weights: packed and split when the plan allows, else one by one."""
        out = self.packed(x, names, biases)
        if out is None:
            return [self.linear(x, n, b) for n, b in zip(names, biases)]
        rows = [self.source.shapes()[n][0] for n in names]
        return self.node("Split", [out, self.const(rows)], n_out=len(names), axis=-1)

    def embedding(self, ids: str) -> str:
        return self._lora(ids, ["model.embed_tokens.weight"], self._embedding(ids))

    def _embedding(self, ids: str) -> str:
        name = "model.embed_tokens.weight"
        kind, weight = self.plan[name], self._tensor(name)
        if kind in ("int4", "int8"):
            bits = int(kind[3:])
            q = quantize_blocks(weight, bits, self.blocks[name])
            data = self.add_weight(name, q.data.reshape(q.data.shape[0], -1))
            return self.node("GatherBlockQuantized", [data, ids, self.add_weight(f"{name}.scales", q.scales)], domain="com.microsoft",
                             bits=bits, block_size=q.block_size, gather_axis=0, quantize_axis=1)
        if kind == "fp16":
            return self.node("Cast", [self.node("Gather", [self.add_weight(name, weight.half().numpy()), ids])], to=TensorProto.FLOAT)
        return self.node("Gather", [self.add_weight(name, weight.numpy()), ids])

    def _norm_weight(self, name: str) -> str:
        """The gain as the kernel multiplies by it: Gemma's (1 + w) is stored as such."""
        return self.add_weight(name, (self._tensor(name) + self.arch.norm_offset).numpy())

    def norm(self, x: str, name: str) -> str:
        return self.node("RMSNormalization", [x, self._norm_weight(name)], axis=-1, epsilon=self.eps)

    def skip_norm(self, residual: str, x: str, name: str) -> tuple[str, str]:
        """RMSNorm(residual + x) and the sum itself (the next residual), in one kernel."""
        # Outputs 1 and 2 (mean, inverse std) are left unnamed, so onnxruntime neither allocates nor writes them.
        node = f"/SkipSimplifiedLayerNormalization_{len(self.nodes)}"
        out, total = f"{node}/out0", f"{node}/out3"
        self.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [residual, x, self._norm_weight(name)], [out, "", "", total],
                                           name=node, domain="com.microsoft", epsilon=self.eps))
        return out, total

    def head_norm(self, x: str, name: str) -> str:
        """Qwen3's per-head RMSNorm of q and k, before RoPE."""
        heads = self.node("Reshape", [x, self.const([0, 0, -1, self.head_dim])])
        return self.node("Reshape", [self.norm(heads, name), self.const([0, 0, -1])])

    def attention(self, i: int, h: str, seqlens: str, total: str) -> str:
        """GroupQueryAttention with this layer's RoPE table in the kernel (none on a NoPE layer; a table narrower than
        the head rotates its leading dims), its window (`local_window_size`: the keys a token sees, itself included, as in
        transformers; measured against it) and scale."""
        p = f"model.layers.{i}.self_attn"
        names, biases = [f"{p}.{n}_proj.weight" for n in "qkv"], [f"{p}.{n}_proj.bias" for n in "qkv"]
        has_head_norm = f"{p}.q_norm.weight" in self.source.shapes()
        if self.arch.fused_qkv:
            qkv = self.linear(h, f"{p}.qkv_proj.weight", f"{p}.qkv_proj.bias")
        else:
            qkv = None if has_head_norm else self.packed(h, names, biases)
        if qkv is not None:
            q, k, v = qkv, "", ""  # GroupQueryAttention splits packed q/k/v itself
        else:
            q, k, v = self.linears(h, names, biases)
            if has_head_norm:
                q, k = self.head_norm(q, f"{p}.q_norm.weight"), self.head_norm(k, f"{p}.k_norm.weight")
        rope, window = self.shape.rope_at(i), self.shape.window(i)
        attrs = dict(num_heads=self.n_head, kv_num_heads=self.n_kv, scale=float(self.shape.attention_scale),
                     do_rotary=int(rope is not None), rotary_interleaved=0)
        if window is not None:
            attrs["local_window_size"] = window
        tables = list(self.rope_inputs[id(rope)]) if rope is not None else []
        self.nodes.append(helper.make_node(
            "GroupQueryAttention", [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total, *tables],
            [f"/attn{i}/out", f"present.{i}.key", f"present.{i}.value"], name=f"/attn{i}", domain="com.microsoft", **attrs))
        return self.linear(f"/attn{i}/out", f"{p}.o_proj.weight")

    def mlp(self, i: int, h: str) -> str:
        p = f"model.layers.{i}.mlp"
        if self.arch.fused_gate_up:
            inter = self.source.config["intermediate_size"]
            gate, up = self.node("Split", [self.linear(h, f"{p}.gate_up_proj.weight"), self.const([inter, inter])], n_out=2, axis=-1)
        else:
            gate, up = self.linears(h, [f"{p}.gate_proj.weight", f"{p}.up_proj.weight"], [None, None])
        if self.arch.activation == "gelu_tanh":
            act = self.node("Gelu", [gate], approximate="tanh")
        else:
            act = self.node("Mul", [gate, self.node("Sigmoid", [gate])])
        return self.linear(self.node("Mul", [act, up]), f"{p}.down_proj.weight")

    def rope_tables(self, total: str) -> None:
        """A cos/sin pair per distinct RoPE (Gemma: local and global). LongRoPE has a short and a long pair, chosen
        per call by the sequence length against the pretraining context, as transformers chooses them."""
        for k, rope in enumerate(self.shape.distinct_ropes()):
            name = "rope" if k == 0 else f"rope{k}"
            if rope.kind != "longrope":
                self.rope_inputs[id(rope)] = self._rope_pair(name, rope, long=False)
                continue
            short, long = self._rope_pair(f"{name}.short", rope, long=False), self._rope_pair(f"{name}.long", rope, long=True)
            longer = self.node("Greater", [total, self.const(rope.original_context, np.int32)])
            rows = [self.shape.max_positions, self.shape.rotary_dim // 2]

            def branch(pair, tag):
                outs = [f"{name}.{tag}.cos.out", f"{name}.{tag}.sin.out"]
                nodes = [helper.make_node("Identity", [t], [o], name=f"/{o}") for t, o in zip(pair, outs)]
                return helper.make_graph(nodes, f"{name}_{tag}", [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, rows) for o in outs])

            self.rope_inputs[id(rope)] = tuple(self.node("If", [longer], n_out=2, then_branch=branch(long, "long"),
                                                         else_branch=branch(short, "short")))

    def _rope_pair(self, name: str, rope, long: bool) -> tuple[str, str]:
        cos, sin = rope_cache(self.shape, rope, long)
        return self.add_weight(f"{name}.cos", cos), self.add_weight(f"{name}.sin", sin)

    def build(self, progress: bool | None) -> onnx.ModelProto:
        mask_sum = self.node("ReduceSum", ["attention_mask", self.const([1])], keepdims=0)
        seqlens = self.node("Cast", [self.node("Sub", [mask_sum, self.const(1)])], to=TensorProto.INT32)
        total = self.node("Cast", [self.node("Gather", [self.node("Shape", ["attention_mask"]), self.const(1)], axis=0)], to=TensorProto.INT32)
        self.rope_tables(total)
        x = self.embedding("input_ids")
        if self.arch.embed_scale:
            x = self.node("Mul", [x, self.const(math.sqrt(self.hidden), np.float32)])
        h = self.norm(x, "model.layers.0.input_layernorm.weight")
        with bar(self.layers + 1, "write ONNX", "layer", progress) as pbar:
            for i in range(self.layers):
                p = f"model.layers.{i}."
                attn = self.attention(i, h, seqlens, total)
                if self.arch.sandwich_norms:  # Gemma: post-attention norm, then the pre-MLP norm on the sum
                    h, x = self.skip_norm(x, self.norm(attn, p + "post_attention_layernorm.weight"), p + "pre_feedforward_layernorm.weight")
                    out = self.norm(self.mlp(i, h), p + "post_feedforward_layernorm.weight")
                else:
                    h, x = self.skip_norm(x, attn, p + "post_attention_layernorm.weight")
                    out = self.mlp(i, h)
                after = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < self.layers else "model.norm.weight"
                h, x = self.skip_norm(x, out, after)
                pbar.update(1)
            start = self.node("Neg", [self.node("Reshape", ["logits_to_keep", self.const([1])])])
            h = self.node("Slice", [h, start, self.const([np.iinfo(np.int64).max]), self.const([1])])
            logits = self.linear(h, "lm_head.weight")
            if cap := self.shape.final_softcap:
                cap = self.const(float(cap), np.float32)
                logits = self.node("Mul", [self.node("Tanh", [self.node("Div", [logits, cap])]), cap])
            self.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))
            pbar.update(1)
        self.data.close()
        return self._model()

    def _model(self) -> onnx.ModelProto:
        f32, n_vocab = TensorProto.FLOAT, self.source.vocab_size
        kv = ["batch", self.n_kv, "past_sequence_length", self.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "kept_positions", n_vocab])]
        for i in range(self.layers):
            for part in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{part}", f32, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{part}", f32, [*kv[:2], "total_sequence_length", kv[3]]))
        inputs.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, []))
        inputs.extend(self.lora.inputs if self.lora else [])
        graph = helper.make_graph(self.nodes, "edgeq_decoder", inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="edgeq")
        model.ir_version = 10
        helper.set_model_props(model, {"edgeq.family": self.source.family, "edgeq.num_layers": str(self.layers),
                                       "edgeq.kv_heads": str(self.n_kv), "edgeq.head_dim": str(self.head_dim),
                                       "edgeq.max_positions": str(self.shape.max_positions)})
        return model


def rope_cache(shape: ModelShape, rope=None, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_positions, rotary_dim/2] of `rope` (default: the full-attention layers') as transformers
    computes them (float32, YaRN's or LongRoPE's factor applied; `long`: LongRoPE's long factors)."""
    rope = rope or shape.rope
    inv_freq = np.asarray(rope.inv_freq(shape.rotary_dim, shape.max_positions, long), dtype=np.float32)
    freqs = np.arange(shape.max_positions, dtype=np.float32)[:, None] * inv_freq[None]
    scale = np.float32(rope.attention_factor())
    return np.cos(freqs) * scale, np.sin(freqs) * scale


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
        use_gptq = rounding == "gptq" and calibration is not None
        plan = plan_precisions(source, precision, overrides, gptq=use_gptq)
        blocks = block_sizes(plan, source.shapes(), block_size)
        integer = any(kind in INT_TYPES for kind in plan.values())
        rounded = gptq_rounding(calibration, plan, blocks, progress, adapters) if use_gptq and integer else None
        importance = calibration.importance(progress) if integer and not use_gptq and calibration is not None else None
        slots = None
        if adapters:
            from .adapters import LoraSlots

            slots = LoraSlots(adapters, source.shapes())
        model = DecoderGraph(source, stage, plan, blocks, accuracy_level, importance, rounded, slots).build(progress)
        check_operators(model)
        onnx.save_model(model, str(stage / MODEL_FILE))
        try:
            onnx.checker.check_model(str(stage / MODEL_FILE))
        except onnx.checker.ValidationError as exc:
            raise EdgeqError(f"internal: the ONNX graph edgeq wrote does not validate ({str(exc).splitlines()[0]}); please report it") from exc
        extra = write_ort_format(stage) if mobile else []
        report = read_back(stage / MODEL_FILE, plan)
        warn_mismatches(log, report["mismatches"])
        int4_blocks = sorted({blocks[n] for n, kind in plan.items() if kind == "int4"})
        if adapters:
            from .adapters import write_adapter

            report["adapters"] = [{**adapter.record(), **write_adapter(adapter, stage)} for adapter in adapters]
        return {"model_file": MODEL_FILE, "precision": precision, "block_size": int4_blocks[0] if len(int4_blocks) == 1 else int4_blocks or None,
                "rounding": ("gptq" if rounded else "importance-weighted" if importance else "nearest") if integer else None,
                "accuracy_level": accuracy_level, "mobile_files": extra, **report}
