"""The KV cache in the budget and the plan: llama.cpp's quantized cache types, priced and chosen (issue 29, item 4)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgeq
from edgeq import registry
from edgeq.errors import EdgeqError
from edgeq.quant.kv_cache import _rounded, measure_kv_error

from conftest import build_model


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory):
    """A tiny Llama whose heads are 32 wide, so llama.cpp's q8_0/q4_0 blocks tile them."""
    return build_model(tmp_path_factory.mktemp("kv") / "wide", hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=4096)


@pytest.fixture(scope="module")
def rotated_heads(tmp_path_factory):
    """Heads 64 wide: llama.cpp rotates keys and values by a Walsh-Hadamard matrix before it quantizes them."""
    return build_model(tmp_path_factory.mktemp("kv") / "rot", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=4096)


def device(tmp_path, budget_gib: float, context: int = 4096):
    toml = tmp_path / f"dev-{budget_gib}.toml"
    toml.write_text(f'''name = "test device"\nkind = "phone"\nos = "android"\n[memory]\nram_gib = 8.0\nbudget_gib = {budget_gib}
bandwidth_gbps = 50.0\n[compute]\ncpu = "test"\ncores = 4\nthreads = 2\ncpu_gflops = 100.0\n[runtime]\nformats = ["gguf"]
context_length = {context}\n[runtime.precisions]\ngguf = ["Q8_0"]\n''')
    return toml


@pytest.mark.parametrize("cache_type", ["q8_0", "q4_0"])
def test_the_simulated_cache_rounds_as_ggml_stores(cache_type):
    """The planner's cache rounds keys and values to exactly the values ggml's own (de)quantization gives."""
    from gguf import GGMLQuantizationType, quants

    x = torch.randn(3, 2, 5, 64) * torch.logspace(-2, 1, 64)
    kind = getattr(GGMLQuantizationType, cache_type.upper())
    ggml = quants.dequantize(quants.quantize(x.reshape(-1, 64).numpy(), kind), kind).reshape(x.shape)
    np.testing.assert_allclose(_rounded(x, cache_type).numpy(), ggml, rtol=0, atol=1e-6)


@pytest.mark.parametrize("heads", ["wide_heads", "rotated_heads"])
def test_llama_cpp_runs_the_bundles_cache_type_and_the_error_is_predicted(heads, request, tmp_path):
    """A bundle exported with --kv-cache q4_0 runs llama.cpp with that cache (its logits move off the f16 cache's), and
    the planner's torch simulation of each type ranks and sizes the error as llama.cpp's own cache does."""
    model = request.getfixturevalue(heads)
    width = json.loads((model / "config.json").read_text())["hidden_size"] // 2
    bundle = edgeq.export(model, format="gguf", precision="F32", kv_cache="q4_0", output=tmp_path / "b", eval_tokens=0)
    manifest = edgeq.inspect(bundle)
    assert manifest["kv_cache"]["type"] == "q4_0"
    assert manifest["kv_cache"]["bytes_per_token"] == 2 * 2 * 1 * width * 18 // 32  # K and V, 2 layers, 1 KV head, 18 B per 32
    loaded = edgeq.load(bundle, threads=1)
    assert loaded.engine.kv_cache == "q4_0"
    loaded.engine.close()
    ids = np.random.default_rng(0).integers(3, 90, 300).tolist()
    engine_cls = registry.runtimes.get("llamacpp")
    logits = {}
    for cache_type in ("f16", "q8_0", "q4_0"):
        engine = engine_cls(bundle / "model.gguf", threads=1, n_ctx=512, kv_cache=cache_type)
        logits[cache_type] = engine.score(ids)
        engine.close()
    from edgeq.quality import QualityAccumulator

    def kl(p, q):
        acc = QualityAccumulator()
        acc.add(p, q, ids)
        return acc.result(ctx=len(ids)).kl

    measured = {t: kl(logits["f16"], logits[t]) for t in ("q8_0", "q4_0")}
    from edgeq.intake import open_model

    reference = registry.runtimes.get(registry.REFERENCE_RUNTIME)(open_model(model), threads=1)
    predicted = measure_kv_error(reference.model, ids, ["q8_0", "q4_0"])
    reference.close()
    assert 0 < measured["q8_0"] < measured["q4_0"]
    assert 0 < predicted["q8_0"] < predicted["q4_0"]
    for cache_type in measured:
        assert 0.33 < predicted[cache_type] / measured[cache_type] < 3, (predicted, measured)


def test_a_cache_type_the_runtime_cannot_store_is_one_line(tiny_llama, wide_heads, tmp_path):
    with pytest.raises(EdgeqError, match="onnx has no KV cache type 'q8_0'"):
        edgeq.export(wide_heads, format="onnx", precision="int8", kv_cache="q8_0", output=tmp_path / "o", eval_tokens=0)
    with pytest.raises(EdgeqError, match="heads are 16 wide; use --kv-cache f16"):
        edgeq.export(tiny_llama, format="gguf", precision="Q8_0", kv_cache="q8_0", output=tmp_path / "g", eval_tokens=0)
    assert not (tmp_path / "o").exists() and not (tmp_path / "g").exists()


def test_memory_that_binds_trades_cache_bits_for_weight_bits(wide_heads, tmp_path):
    """On a device whose memory cannot hold Q8_0 weights beside an f16 cache at its context, the plan is made for
    each cache type and the lowest predicted weights + cache KL wins; with room to spare, the cache stays f16
    and nothing is measured."""
    from edgeq.model_shape import ModelShape

    shape = ModelShape.from_config(json.loads((wide_heads / "config.json").read_text()))
    f16 = shape.kv_cache_bytes(4096, 2)
    from edgeq.quant.budget import RUNTIME_OVERHEAD

    roomy = edgeq.plan(wide_heads, device=device(tmp_path, 1.0))
    assert roomy.kv_cache["type"] == "f16" and not roomy.kv_cache["memory_binds"] and roomy.kv_cache["trade"] == []
    weights_q8 = roomy.total_bytes  # Q8_0 everywhere: the device's preferred size
    tight_gib = (RUNTIME_OVERHEAD + f16 + weights_q8 * 0.6) / 2**30  # room for f16 cache and 60% of the weights
    tight = edgeq.plan(wide_heads, device=device(tmp_path, tight_gib))
    kv = tight.kv_cache
    assert kv["memory_binds"] and [r["type"] for r in kv["trade"]] == ["f16", "q8_0", "q4_0"]
    assert kv["measured_tokens"] >= 2048
    by_type = {r["type"]: r for r in kv["trade"]}
    assert by_type["q4_0"]["weights_budget"] >= by_type["q8_0"]["weights_budget"] > by_type["f16"]["weights_budget"]
    assert by_type["q4_0"]["weights_kl"] <= by_type["q8_0"]["weights_kl"] <= by_type["f16"]["weights_kl"]
    best = min(kv["trade"], key=lambda r: r["weights_kl"] + r["predicted_kl"])
    assert kv["type"] == best["type"] and kv["type"] != "f16"
    assert tight.total_bytes <= by_type[kv["type"]]["weights_budget"]
    forced = edgeq.plan(wide_heads, device=device(tmp_path, tight_gib), kv_cache="f16")
    assert forced.kv_cache["type"] == "f16" and forced.total_bytes <= by_type["f16"]["weights_budget"]
    from click.testing import CliRunner

    from edgeq.cli import main

    shown = CliRunner().invoke(main, ["plan", str(wide_heads), "--device", str(device(tmp_path, tight_gib))])
    assert shown.exit_code == 0, shown.output
    trade = shown.output[shown.output.index("KV cache"):].splitlines()
    assert trade[0].startswith(f"KV cache {kv['type']}:") and "at 4096 tokens" in trade[0]
    assert [line.split()[0] for line in trade[2:5]] == ["f16", "q8_0", "q4_0"] and "<- chosen" in trade[2 + ["f16", "q8_0", "q4_0"].index(kv["type"])]


def test_a_planned_bundle_asks_for_its_cache_and_reports_memory_with_it(wide_heads, tmp_path):
    from edgeq.profiling import describe

    bundle = edgeq.export(wide_heads, format="gguf", precision="Q8_0", kv_cache="q8_0", output=tmp_path / "q8", eval_tokens=0)
    plain = edgeq.export(wide_heads, format="gguf", precision="Q8_0", output=tmp_path / "f16", eval_tokens=0)
    assert edgeq.inspect(plain)["kv_cache"]["type"] == "f16"
    assert describe(bundle)["kv_bytes_per_token"] == round(describe(plain)["kv_bytes_per_token"] * 34 / 32 / 2)
