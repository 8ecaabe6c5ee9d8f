"""ONNX export of tiny models: logits and greedy tokens against torch, weight types read back, plain onnxruntime, bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import edgeq
from edgeq.cli import main as cli
from edgeq.converters.onnx.convert import ONNXConverter
from edgeq.converters.onnx.graph import DecoderGraph
from edgeq.quality import QualityAccumulator
from edgeq.intake import open_model
from edgeq.runtimes.torch import TorchEngine

from conftest import build_model

TEXT = np.random.default_rng(0).integers(3, 390, 48).tolist()
ARCHITECTURES = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


def _quality(ref, got, tokens=TEXT):
    acc = QualityAccumulator()
    acc.add(ref, got, tokens)
    return acc.result(ctx=len(tokens))


def _export(model, tmp_path, precision, **kw):
    return edgeq.export(model, format="onnx", precision=precision, output=tmp_path / f"b-{precision}", eval_tokens=0, **kw)


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 400
    return message


def _int_bytes(shape, bits, block=32, scales="fp32"):
    rows, cols = shape
    return rows * cols * bits // 8 + rows * (cols // block) * {"fp32": 4, "fp16": 2}[scales]  # codes + one scale per block


def test_int8_types_and_sizes_read_back(tmp_path, tiny_llama):
    bundle = _export(tiny_llama, tmp_path, "int8")
    manifest = edgeq.inspect(bundle)
    matrices = {n: t for n, t in manifest["tensors"].items() if len(t["shape"]) == 2}
    assert len(matrices) == 2 + 2 * 7  # embeddings, lm_head, 7 per layer
    for name, info in matrices.items():
        block = 64 if name == "model.embed_tokens.weight" else 32  # a table's rows in blocks of 64, linears Q8_0's 32
        assert info["type"] == "int8" and info["block_size"] == block and info["scales"] == "fp16"  # activations far below float16's range
        assert info["bytes"] == _int_bytes(info["shape"], 8, block, scales="fp16")
    assert manifest["tensors"]["model.norm.weight"]["type"] == "fp32"
    assert 8.0 < manifest["bits_per_weight"] < 9.5 and not manifest["mismatches"]
    # q/k/v and gate/up each run as one kernel: 4 per layer and the lm_head
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 4 * 2 + 1
    ref = TorchEngine(open_model(tiny_llama)).score(TEXT)
    with edgeq.load(bundle) as lm:
        assert _quality(ref, lm.engine.score(TEXT)).kl < 5e-3


def test_int4_plan_overrides_are_applied_in_the_file(tmp_path, tiny_llama):
    source = open_model(tiny_llama)
    stage = tmp_path / "stage"
    stage.mkdir()
    overrides = {"model.layers.0.self_attn.v_proj.weight": "int8", "model.layers.1.mlp.down_proj.weight": "fp16",
                 "lm_head.weight": "fp32"}
    fields = ONNXConverter().convert(source, stage, precision="int4", overrides=overrides)
    types = {n: t["type"] for n, t in fields["tensors"].items()}
    assert types["model.layers.0.self_attn.v_proj.weight"] == "int8"
    assert types["model.layers.1.mlp.down_proj.weight"] == "fp16"
    assert types["lm_head.weight"] == "fp32"
    assert types["model.embed_tokens.weight"] == "int8"  # INT4 without GPTQ keeps the table at 8 bits unless the plan says otherwise
    q_proj = fields["tensors"]["model.layers.1.self_attn.q_proj.weight"]
    assert q_proj["type"] == "int4" and q_proj["block_size"] == 64 and q_proj["bytes"] == _int_bytes(q_proj["shape"], 4, 64)
    # the file itself, not the report: the node that multiplies by v_proj runs 8 bits, down_proj is a float MatMul
    graph = onnx.load(str(stage / "model.onnx"), load_external_data=False).graph
    consumer = {i: n for n in graph.node for i in n.input}
    v_node = consumer["model.layers.0.self_attn.v_proj.weight"]
    assert v_node.op_type == "MatMulNBits" and next(a.i for a in v_node.attribute if a.name == "bits") == 8
    assert consumer["model.layers.1.mlp.down_proj.weight"].op_type == "Cast"
    with pytest.raises(edgeq.EdgeqError, match="has no such tensor"):
        ONNXConverter().convert(source, tmp_path, precision="int4", overrides={"model.layers.9.mlp.up_proj.weight": "int8"})


@pytest.mark.parametrize("tied", [False, True])
def test_int4_rounded_by_gptq_writes_its_recipe(tmp_path, tied):
    """The INT4 default (GPTQ) is a recipe, read back from the file: k/v/o_proj at INT8, down_proj in blocks of 16, the
    rest in blocks of 32, and the table at INT4, in blocks of 128 for a lookup alone, of 16 when the head reads it too.
    Without GPTQ the table stays at INT8."""
    folder = build_model(tmp_path / "m", hidden_size=128, intermediate_size=256, tie_word_embeddings=tied)
    bundle = edgeq.export(folder, format="onnx", precision="int4", output=tmp_path / "gptq", eval_tokens=0)
    tensors = edgeq.inspect(bundle)["tensors"]
    written = {name: (t["type"], t.get("block_size")) for name, t in tensors.items()}
    for name, kind in written.items():
        if name.endswith(("k_proj.weight", "v_proj.weight", "o_proj.weight")):
            assert kind == ("int8", 32), name
        elif name.endswith("down_proj.weight"):
            assert kind == ("int4-block16", 16), name
        elif name.endswith(("q_proj.weight", "gate_proj.weight", "up_proj.weight")) or name == "lm_head.weight":
            assert kind == ("int4", 32), name
    assert "lm_head.weight" not in written if tied else "lm_head.weight" in written
    assert written["model.embed_tokens.weight"] == (("int4-block16", 16) if tied else ("int4-block128", 128))
    nearest = edgeq.export(folder, format="onnx", precision="int4", rounding="nearest", output=tmp_path / "nearest", eval_tokens=0)
    assert edgeq.inspect(nearest)["tensors"]["model.embed_tokens.weight"]["type"] == "int8"


def test_tensor_types_make_exceptions_to_a_forced_precision(tmp_path, tiny_llama):
    bundle = edgeq.export(tiny_llama, format="onnx", precision="int4", tensor_types={"lm_head.weight": "int4"},
                          output=tmp_path / "head4", eval_tokens=0)
    types = {name: t["type"] for name, t in edgeq.inspect(bundle)["tensors"].items()}
    assert types["lm_head.weight"] == "int4" and types["model.embed_tokens.weight"] == "int8"  # 64 wide: no block of 128 divides it


@pytest.mark.parametrize("bits,block,cols", [(4, 32, 64), (4, 16, 80), (8, 32, 80)])
def test_block_packing_is_what_matmulnbits_reads(bits, block, cols):
    """onnxruntime's kernel (fp32 compute) on our codes and scales equals x times our own dequantization."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from edgeq.converters.onnx.blocks import dequantize, quantize_blocks

    weight = torch.randn(24, cols, generator=torch.Generator().manual_seed(0))
    q = quantize_blocks(weight, bits, block)
    dequantized = dequantize(q, cols)
    assert 0 < np.abs(dequantized - weight.numpy()).max() < (0.3 if bits == 4 else 0.02)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=cols, N=24, bits=bits,
                            block_size=block, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(q.data, "w"), numpy_helper.from_array(q.scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    x = np.random.default_rng(0).standard_normal((3, cols)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantized.T, rtol=1e-4, atol=1e-4)


PLAIN_ORT = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort

    folder, tokens = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
    for name in ("model.onnx", "model.ort"):
        session = ort.InferenceSession(f"{folder}/{name}", providers=["CPUExecutionProvider"])
        ids = np.array([tokens], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "logits_to_keep": np.array(0, dtype=np.int64)}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values"):
                feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
        np.save(f"{folder}/{name}.logits.npy", session.run(["logits"], feeds)[0][0])
    assert not any(m.startswith("edgeq") for m in sys.modules), "edgeq was imported"
""")


def test_plain_onnxruntime_and_ort_format_run_the_export(tmp_path, tiny_llama):
    bundle = edgeq.export(tiny_llama, format="onnx", precision="int4", mobile=True, output=tmp_path / "mobile", eval_tokens=0)
    manifest = edgeq.inspect(bundle)
    assert manifest["mobile_files"] == ["model.ort", "required_operators.config"]
    assert set(manifest["mobile_files"]) <= set(manifest["files"])
    config = (bundle / "required_operators.config").read_text()
    assert "com.microsoft;1;" in config and "MatMulNBits" in config and "GroupQueryAttention" in config and "partial" not in config
    with edgeq.load(bundle) as lm:
        expected = lm.engine.score(TEXT)
    # -I: isolated mode, so neither the test's path nor PYTHONPATH can bring edgeq in
    subprocess.run([sys.executable, "-I", "-c", PLAIN_ORT, str(bundle), ",".join(map(str, TEXT))], check=True, cwd=tmp_path, timeout=120)
    for name in ("model.onnx", "model.ort"):
        np.testing.assert_allclose(np.load(bundle / f"{name}.logits.npy"), expected, atol=2e-3, err_msg=name)


def test_int4_on_a_width_the_block_does_not_divide_is_refused(tmp_path):
    model = build_model(tmp_path / "odd", intermediate_size=80)  # down_proj is 80 wide: 80 % 32 = 16
    with pytest.raises(edgeq.EdgeqError) as excinfo:
        _export(model, tmp_path, "int4", block_size=32)
    message = _one_line_error(excinfo)
    assert "block size 32" in message and "80" in message and "down_proj" in message and "16" in message
    assert [p.name for p in tmp_path.iterdir()] == ["odd"]
    bundle = _export(model, tmp_path, "int4", block_size=16)  # the block the message names works
    assert edgeq.inspect(bundle)["tensors"]["model.layers.0.mlp.down_proj.weight"]["block_size"] == 16


def test_int4_default_block_is_64_where_it_divides_and_smaller_where_not(tmp_path):
    model = build_model(tmp_path / "odd", intermediate_size=80, hidden_size=96)  # 96: 32 divides, 64 not; 80: only 16
    report = edgeq.inspect(_export(model, tmp_path, "int4", rounding="nearest"))
    blocks = {name: t.get("block_size") for name, t in report["tensors"].items() if t["type"] == "int4"}
    assert blocks["model.layers.0.mlp.down_proj.weight"] == 16 and blocks["model.layers.0.self_attn.q_proj.weight"] == 32
    assert sorted(report["block_size"]) == [16, 32]
    (tmp_path / "e").mkdir()
    wide = edgeq.inspect(_export(build_model(tmp_path / "even"), tmp_path / "e", "int4", rounding="nearest"))
    assert wide["block_size"] == 64 and wide["tensors"]["model.layers.0.mlp.down_proj.weight"]["block_size"] == 64


def test_int4_types_named_by_block_are_written_priced_and_read_back_as_asked(tmp_path, tiny_llama):
    """A plan moves bytes between tensors through int4 types named by their block; each is written in that block,
    costs what the planner's space prices, and a wrong one is refused in one line."""
    from edgeq.converters.onnx.spec import ONNX

    source = open_model(tiny_llama)
    stage = tmp_path / "stage"
    stage.mkdir()
    asked = {"model.layers.0.self_attn.q_proj.weight": "int4-block16", "model.layers.0.self_attn.k_proj.weight": "int4-block64",
             "model.layers.1.mlp.down_proj.weight": "int4-block128", "model.layers.1.mlp.up_proj.weight": "int4-block32"}
    fields = ONNXConverter().convert(source, stage, precision="int4", overrides=asked, rounding="nearest")
    assert fields["mismatches"] == []
    space, shapes = ONNX.space(), source.shapes()
    for name, kind in asked.items():
        info = fields["tensors"][name]
        assert info["type"] == kind and info["block_size"] == int(kind.split("block")[1])
        block = info["block_size"]
        assert info["bytes"] == _int_bytes(shapes[name], 4, block, scales=info["scales"])
        assert space.nbytes(kind, shapes[name]) == _int_bytes(shapes[name], 4, block, scales="fp16")  # a plan's scales (calibrated)
    graph = onnx.load(str(stage / "model.onnx"), load_external_data=False).graph
    consumer = {i: n for n in graph.node for i in n.input}
    down = consumer["model.layers.1.mlp.down_proj.weight"]
    assert next(a.i for a in down.attribute if a.name == "block_size") == 128
    # q and k at different blocks are not packed into one kernel: q's node reads q alone, in blocks of 16
    q_node = consumer["model.layers.0.self_attn.q_proj.weight"]
    assert q_node.op_type == "MatMulNBits" and next(a.i for a in q_node.attribute if a.name == "block_size") == 16
    assert space.candidates(shapes["model.layers.1.mlp.down_proj.weight"])[:4] == ["int4-block128", "int4-block64", "int4", "int4-block16"]
    for kind, match in (("int4-block48", "unknown ONNX tensor type"), ("int4-block128", "does not divide the width 64")):
        with pytest.raises(edgeq.EdgeqError, match=match) as excinfo:
            ONNXConverter().convert(source, tmp_path, precision="int4", overrides={"model.layers.0.mlp.up_proj.weight": kind})
        _one_line_error(excinfo)


def test_only_arrays_over_a_mebibyte_are_aligned_in_the_external_data(tmp_path):
    """onnxruntime memory-maps an array that starts on a 64 KiB boundary; padding every array of 64 KiB cost 4% of a
    0.5B model's int4 file, so only arrays over 1 MiB are aligned (onnx's and onnxruntime's own rule), and the rest
    follow each other unpadded."""
    from edgeq.converters.onnx.spec import ALIGN, ALIGN_ABOVE
    from edgeq.converters.onnx.weights import ExternalData

    data = ExternalData(tmp_path, "w.data")
    sizes = [3000, 5 * ALIGN // 4, ALIGN_ABOVE + 8, 2 * ALIGN + 1, ALIGN_ABOVE * 2 + 100, 17]
    offsets = []
    for index, size in enumerate(sizes):
        tensor = data.add(f"t{index}", np.full(size, index, np.uint8))
        offsets.append(int(next(e.value for e in tensor.external_data if e.key == "offset")))
    data.close()
    written = (tmp_path / "w.data").read_bytes()
    for index, (offset, size) in enumerate(zip(offsets, sizes)):
        assert written[offset:offset + size] == bytes([index]) * size
        if size > ALIGN_ABOVE:
            assert offset % ALIGN == 0
        elif index:
            assert offset == offsets[index - 1] + sizes[index - 1]  # no padding before an array of 1 MiB or less
    assert len(written) < sum(sizes) + 2 * ALIGN


def test_what_the_model_file_holds_beside_the_weights_is_priced(tmp_path):
    """--size plans the weights within what the format's file_overhead leaves: the graph, alignment and the RoPE
    tables over the trained context (float32 cos and sin, 8.4 MB at Qwen2.5's 32k) must be in it, or a plan lands over."""
    from edgeq.converters.onnx.spec import ONNX

    source = open_model(build_model(tmp_path / "long", max_position_embeddings=65536))
    stage = tmp_path / "stage"
    stage.mkdir()
    fields = ONNXConverter().convert(source, stage, precision="int4", rounding="nearest")
    beside = sum((stage / n).stat().st_size for n in ("model.onnx", "model.onnx.data")) - sum(t["bytes"] for t in fields["tensors"].values())
    estimate = ONNX.file_overhead(source, len(source.shapes()), 4096)
    assert beside > 4 << 20  # 65536 positions x 8 frequencies x 4 bytes, cos and sin
    assert 0.9 < estimate / beside < 1.1


def test_corrupt_onnx_in_a_bundle_is_caught(tmp_path, tiny_llama):
    bundle = _export(tiny_llama, tmp_path, "int8")
    with open(bundle / "model.onnx", "r+b") as f:
        f.seek(20)
        f.write(b"\xff" * 64)
    with pytest.raises(edgeq.EdgeqError) as excinfo:
        edgeq.load(bundle)
    assert "model.onnx does not match its checksum" in _one_line_error(excinfo)
    with pytest.raises(edgeq.EdgeqError) as excinfo:
        edgeq.load(bundle, verify=False)
    assert "onnxruntime could not load" in _one_line_error(excinfo)


def test_an_op_onnxruntime_lacks_stops_the_export(tmp_path, tiny_llama, monkeypatch):
    def fused_mlp(self, i, h):  # a fused MLP kernel that onnxruntime only has on GPUs
        return self.node("MatMulNBitsMlp", [h], domain="com.microsoft")

    monkeypatch.setattr(DecoderGraph, "mlp", fused_mlp)
    with pytest.raises(edgeq.EdgeqError) as excinfo:
        _export(tiny_llama, tmp_path, "int4")
    assert "no CPU kernel for MatMulNBitsMlp" in _one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


def test_mobile_is_refused_for_gguf_before_any_work(tmp_path, tiny_llama):
    with pytest.raises(edgeq.EdgeqError, match="--mobile does not apply to the gguf format"):
        edgeq.export(tiny_llama, format="gguf", precision="Q8_0", mobile=True, output=tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_inspect_eval_on_onnx(tmp_path, tiny_llama):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(cli, ["export", str(tiny_llama), "--format", "onnx", "--precision", "int8", "-o", str(out),
                                 "--eval-tokens", "256"])
    assert result.exit_code == 0, result.output
    assert "format onnx  precision int8" in result.output and "vs reference: KL" in result.output
    inspected = runner.invoke(cli, ["inspect", str(out)])
    assert inspected.exit_code == 0 and "int8 ×16" in inspected.output and "fp32 ×5" in inspected.output
    evaluated = runner.invoke(cli, ["eval", str(out), "--tokens", "256", "--ctx", "64", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    quality = json.loads(evaluated.output)
    assert quality["kl"] < 5e-3 and quality["top1"] > 0.9 and quality["tokens"] == 256


@pytest.mark.integration
def test_smollm2_fp32_matches_torch(tmp_path):
    from edgeq.default_model import default_model_path
    from edgeq.quality import DEFAULT_TEXT
    from edgeq.quant.calibration import calibration_windows

    model = default_model_path(progress=False)
    bundle = _export(model, tmp_path, "fp32")
    reference = TorchEngine(open_model(model))
    window = calibration_windows(reference.source.chat_tokenizer(), DEFAULT_TEXT, 256, 256)[0]
    ref = reference.score(window)
    with edgeq.load(bundle, n_ctx=512) as lm:
        quality = _quality(ref, lm.engine.score(window), window)
    assert quality.kl < 1e-4 and quality.top1 >= 0.999


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


@pytest.mark.parametrize("table", ["int8", "int4"])
def test_a_tied_table_is_stored_once_for_the_lookup_and_the_head(tmp_path, tiny_tied, table, monkeypatch):
    """The lookup reads the head's MatMulNBits blocks (one stored table, as llama.cpp stores a tied one), with the same
    logits as two stored copies; a type asked for either name is the table's."""
    from edgeq.converters.onnx import graph as onnx_graph

    def export(name, shared):
        monkeypatch.setattr(onnx_graph, "shares_table", onnx_graph.shares_table if shared else lambda *a: False)
        bundle = edgeq.export(tiny_tied, format="onnx", precision="int4", tensor_types={"lm_head.weight": table},
                              rounding="nearest", output=tmp_path / name, eval_tokens=0)
        with edgeq.load(bundle, threads=1) as lm:
            return bundle, edgeq.inspect(bundle)["tensors"], lm.engine.score(TEXT)

    bundle, tensors, logits = export("shared", True)
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"]["type"] == table
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    readers = {n.op_type for n in graph.node if "model.embed_tokens.weight" in n.input}
    assert readers == {"MatMulNBits", "Reshape"}
    assert not [i.name for i in graph.initializer if i.name.startswith("lm_head")]
    _, two_tensors, two_logits = export("two", False)
    assert np.array_equal(logits, two_logits)
    table_bytes = tensors["model.embed_tokens.weight"]["bytes"]
    assert two_tensors["lm_head.weight"]["bytes"] == table_bytes
    assert sum(t["bytes"] for t in two_tensors.values()) - sum(t["bytes"] for t in tensors.values()) == table_bytes


def test_a_tied_table_asked_two_types_is_written_twice(tmp_path, tiny_tied):
    bundle = edgeq.export(tiny_tied, format="onnx", precision="int4", rounding="nearest", output=tmp_path / "b", eval_tokens=0,
                          tensor_types={"lm_head.weight": "int4", "model.embed_tokens.weight": "int8"})
    types = {name: t["type"] for name, t in edgeq.inspect(bundle)["tensors"].items()}
    assert types["lm_head.weight"] == "int4" and types["model.embed_tokens.weight"] == "int8"


def test_a_layer_with_massive_activations_computes_scaled_down_in_float16(tmp_path, monkeypatch):
    """Float16 scales make MatMulNBits compute in float16; a down_proj whose outputs reach 10^5 would overflow it, so its
    input is divided by a power of two before the cast and its output multiplied back after, and the logits stay the
    model's; without that scaling they do not."""
    from safetensors.torch import load_file, save_file

    from edgeq.converters.onnx import convert as onnx_convert

    folder = build_model(tmp_path / "massive")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"] *= 3e4
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    ref = TorchEngine(open_model(folder)).score(TEXT)

    def export(name):
        bundle = edgeq.export(folder, format="onnx", precision="int4", output=tmp_path / name, eval_tokens=0)
        tensors = edgeq.inspect(bundle)["tensors"]
        assert {(t["scales"], t["block_size"]) for t in tensors.values() if t["type"] == "int4"} == {("fp16", 32)}
        graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
        with edgeq.load(bundle, threads=1) as lm:
            return sum(n.op_type == "Mul" for n in graph.node), lm.engine.score(TEXT)

    muls, logits = export("scaled")
    kept = _quality(ref, logits).kl
    monkeypatch.setattr(onnx_convert, "HALF_PEAK", float("inf"))  # no layer scaled
    plain_muls, plain = export("plain")
    assert muls == plain_muls + 2  # down by 2^k before layer 0's down_proj, up after
    assert not np.isfinite(plain).all() or _quality(ref, plain).kl > 10 * kept, kept
