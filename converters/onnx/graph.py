"""The ONNX decoder graph with KV cache, built node by node on onnxruntime's contrib ops.

Graph interface (plain onnxruntime can run it): `input_ids` [batch, seq] int64, `attention_mask`
[batch, total] int64, `past_key_values.{i}.key|value` [batch, kv_heads, past, head_dim] float32,
`logits_to_keep` (int64 scalar: 0 = every position, 1 = the last) → `logits`, `present.{i}.key|value`.
A present buffer may be the same memory as its past buffer (sized for the whole context): then the
cache grows in place, which is how `edgeq.runtimes.ort` runs it. With LoRA adapters kept apart, the graph also
takes each adapted weight's `<module>.lora_A` / `.lora_B` (overridable, zero by default; `adapters.py`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeq.intake import SourceModel
from edgeq.model_shape import ModelShape
from edgeq.progress import bar
from edgeq.quant.rotation import HEAD_MIX_TENSOR

from .blocks import Quantized, quantize_blocks
from .spec import type_bits
from .weights import ExternalData

DATA_FILE = "model.onnx.data"
OPSET = 23  # RMSNormalization is standard from 23


TABLE, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def matrix_shape(shapes: dict[str, tuple], name: str) -> tuple:
    """(rows, cols) of a planned matrix; a tied lm_head has the embedding's."""
    return tuple(shapes.get(name) or shapes[TABLE])


def shares_table(shapes: dict[str, tuple], plan: dict[str, str], blocks: dict[str, int]) -> bool:
    """Whether the lookup and the head read one stored table: the checkpoint ties them and the plan encodes both alike in
    integer blocks. The head's MatMulNBits layout is then the only copy (GatherBlockQuantized reads the same bytes as
    rows), as llama.cpp stores a tied table once; a float or a differently encoded pair is written twice."""
    return (HEAD not in shapes and plan.get(HEAD) == plan.get(TABLE) and bool(type_bits(plan.get(HEAD, "")))
            and blocks.get(HEAD) == blocks.get(TABLE))


class DecoderGraph:
    """Accumulates nodes and initializers; weights go straight to the external-data file."""

    def __init__(self, source: SourceModel, stage: Path, plan: dict[str, str], blocks: dict[str, int],
                 accuracy_level: int, importance: dict[str, np.ndarray] | None, rounded: dict[str, Quantized] | None = None,
                 lora=None, half: dict[str, int] | None = None, head_mix: np.ndarray | None = None):
        self.source, self.plan, self.blocks = source, plan, blocks
        self.lora = lora  # onnx_adapters.LoraSlots of the kept adapters, or None
        self.half = half or {}  # integer weights stored with float16 scales → the power of two their input is divided by
        self.head_mix = head_mix  # a rotated tied model's: the head reads the table after this hidden × hidden matrix
        self.accuracy_level, self.importance = accuracy_level, importance or {}
        self.rounded = dict(rounded or {})  # GPTQ's result, taken (and dropped) as each weight is written
        self.data = ExternalData(stage, DATA_FILE)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self._written: dict[str, tuple] = {}  # stored name → what `_quantized` returned for it
        self._as_half: dict[tuple[str, int], str] = {}  # (input, shift) → its float16 cast, for MatMulNBits with float16 scales
        self.shape = shape = ModelShape.from_config(source.config)
        self.hidden, self.layers, self.n_head, self.n_kv, self.head_dim = shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.head_dim
        self.eps = float(source.config["rms_norm_eps"])
        self.arch = source.arch  # the family's block: norm offset, sandwich norms, activation, fused projections
        self.rope_inputs: dict[int, tuple[str, str]] = {}  # id(Rope) → its cos/sin inputs of GroupQueryAttention
        self.shared_table = shares_table(source.shapes(), plan, blocks)

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

    def _quantized(self, name: str, stored_as: str | None = None) -> tuple[str, str, int, int, int, int]:
        """Writes `name` (under `stored_as`, default its own name) and its scales as the plan encodes them; returns
        (weight, scales, rows, cols, bits, block). A shared table is written once and found again by its stored name."""
        stored = stored_as or name
        if stored in self._written:
            return self._written[stored]
        q = self.rounded.pop(name, None)
        if q is None:
            q = quantize_blocks(self._tensor(name), type_bits(self.plan[name]), self.blocks[name], self.importance.get(name),
                                half=name in self.half)
        self.add_weight(f"{stored}.scales", q.scales)
        self._written[stored] = (self.add_weight(stored, q.data), f"{stored}.scales", *matrix_shape(self.source.shapes(), name),
                                 q.bits, q.block_size, q.scales.dtype == np.float16)
        return self._written[stored]

    def _matmul_nbits(self, x: str, weight: str, scales: str, rows: int, cols: int, bits: int, block: int, half: bool,
                      shift: int = 0) -> str:
        """MatMulNBits computes in its scales' dtype: float16 scales take `x` cast to float16 (once per input; divided by
        2^shift first where the layer's activations would overflow float16) and give float16 out, cast back (and
        multiplied back), so the residual stream and everything else stay float32."""
        if half:
            if (x, shift) not in self._as_half:
                scaled = self.node("Mul", [x, self.const(2.0 ** -shift, np.float32)]) if shift else x
                self._as_half[x, shift] = self.node("Cast", [scaled], to=TensorProto.FLOAT16)
            x = self._as_half[x, shift]
        out = self.node("MatMulNBits", [x, weight, scales], domain="com.microsoft", K=cols, N=rows, bits=bits,
                        block_size=block, accuracy_level=self.accuracy_level)
        if not half:
            return out
        out = self.node("Cast", [out], to=TensorProto.FLOAT)
        return self.node("Mul", [out, self.const(2.0 ** shift, np.float32)]) if shift else out

    def _bias(self, out: str, bias: str | None) -> str:
        if bias and bias in self.source.shapes():
            return self.node("Add", [out, self.add_weight(bias, self._tensor(bias).numpy())])
        return out

    def _lora(self, x: str, names: list[str], out: str) -> str:
        return out if self.lora is None else self.lora.add(self, x, names, out)

    def linear(self, x: str, name: str, bias: str | None = None) -> str:
        kind = self.plan[name]
        if name == HEAD and self.head_mix is not None:  # symmetric: x·M is the head's input for the table's rows
            mix = self.node("Cast", [self.add_weight(HEAD_MIX_TENSOR, self.head_mix.astype(np.float16))], to=TensorProto.FLOAT)
            x = self.node("MatMul", [x, mix])
        if type_bits(kind):
            stored = TABLE if self.shared_table and name == HEAD else None
            out = self._matmul_nbits(x, *self._quantized(name, stored), shift=self.half.get(name, 0))
            return self._lora(x, [name], self._bias(out, bias))
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
        kinds = {(self.plan[n], self.blocks.get(n), self.half.get(n)) for n in names}
        present = [b for b in biases if b and b in self.source.shapes()]
        if len(kinds) > 1 or not type_bits(next(iter(kinds))[0]) or 0 < len(present) < len(names):
            return None
        parts = [self._quantized(n) for n in names]
        weight = self.node("Concat", [p[0] for p in parts], axis=0)
        scales = self.node("Concat", [p[1] for p in parts], axis=0)
        out = self._matmul_nbits(x, weight, scales, sum(p[2] for p in parts), *parts[0][3:], shift=self.half.get(names[0], 0))
        out = self._lora(x, names, out)
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
        name = TABLE
        if self.shared_table:  # the head's MatMulNBits blocks, read as rows (GatherBlockQuantized takes them 2-D)
            data, scales, rows, _, bits, block, half = self._quantized(HEAD, stored_as=TABLE)
            table = self.node("Reshape", [data, self.const([rows, -1])])
            return self._lookup(table, ids, scales, bits, block, half)
        kind, weight = self.plan[name], self._tensor(name)
        if bits := type_bits(kind):
            q = quantize_blocks(weight, bits, self.blocks[name], half=name in self.half)
            data = self.add_weight(name, q.data.reshape(q.data.shape[0], -1))
            return self._lookup(data, ids, self.add_weight(f"{name}.scales", q.scales), bits, q.block_size, q.scales.dtype == np.float16)
        if kind == "fp16":
            return self.node("Cast", [self.node("Gather", [self.add_weight(name, weight.half().numpy()), ids])], to=TensorProto.FLOAT)
        return self.node("Gather", [self.add_weight(name, weight.numpy()), ids])

    def _lookup(self, table: str, ids: str, scales: str, bits: int, block: int, half: bool) -> str:
        """Rows of a block-quantized table (in its scales' dtype), as float32."""
        rows = self.node("GatherBlockQuantized", [table, ids, scales], domain="com.microsoft",
                         bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
        return self.node("Cast", [rows], to=TensorProto.FLOAT) if half else rows

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
