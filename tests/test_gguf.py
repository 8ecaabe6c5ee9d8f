"""GGUF export of tiny models: LoRA merge, tensor types read back, quality record (the float checks: test_backends.py)."""
from __future__ import annotations

import json

import numpy as np

import edgeq
from edgeq.bundle import MANIFEST
from edgeq.converters.gguf.convert import GGUFConverter
from edgeq.converters.gguf.quantize import read_tensor_types
from edgeq.quality import QualityAccumulator
from edgeq.intake import open_model
from edgeq.runtimes.llamacpp import LlamaCppEngine
from edgeq.runtimes.torch import TorchEngine

TEXT = [0, 5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300]


def _assert_same_distribution(got, ref):
    """llama.cpp keeps its KV cache in F16, so F32 weights agree to ~1e-2 in logits, not to float32 precision."""
    acc = QualityAccumulator()
    acc.add(ref, got, TEXT)
    quality = acc.result(ctx=len(TEXT))
    assert quality.kl < 1e-4 and quality.top1 == 1.0


def _export(model, tmp_path, precision, **kw):
    return edgeq.export(model, format="gguf", precision=precision, output=tmp_path / f"b-{precision}", eval_tokens=0, **kw)


def test_lora_merge_reaches_gguf(tmp_path, tiny_llama, tiny_lora):
    bundle = _export(tiny_llama, tmp_path, "F32", adapter=tiny_lora)
    merged = TorchEngine(open_model(tiny_llama, adapter=tiny_lora)).score(TEXT)
    base = TorchEngine(open_model(tiny_llama)).score(TEXT)
    with LlamaCppEngine(bundle / "model.gguf") as engine:
        got = engine.score(TEXT)
    assert np.abs(merged - base).max() > 0.05  # the adapter changes the model …
    _assert_same_distribution(got, merged)  # … and the export carries the change
    assert json.loads((bundle / MANIFEST).read_text())["source"]["adapter"]["sha256"]


def test_quantized_types_read_back_with_fallbacks_reported(tmp_path, tiny_llama):
    bundle = _export(tiny_llama, tmp_path, "Q4_K_M")
    manifest = edgeq.inspect(bundle)
    types = {t["type"] for t in manifest["tensors"].values()}
    # width-64/128 rows cannot hold 256-wide K blocks: llama.cpp falls back, and edgeq says so
    assert not any(t.endswith("_K") for name, t in ((n, i["type"]) for n, i in manifest["tensors"].items()) if "attn_q" in name)
    assert manifest["mismatches"] and all("256" in m["why"] for m in manifest["mismatches"])
    assert "F32" in types and 3.0 < manifest["bits_per_weight"] < 9.0


def test_per_tensor_overrides_apply_and_are_verified(tmp_path, tiny_llama):
    source = open_model(tiny_llama)
    stage = tmp_path / "stage"
    stage.mkdir()
    overrides = {"model.layers.0.self_attn.v_proj.weight": "Q8_0", "model.layers.1.mlp.down_proj.weight": "F16"}
    fields = GGUFConverter().convert(source, stage, precision="Q4_0", overrides=overrides)
    assert fields["tensors"]["blk.0.attn_v.weight"]["type"] == "Q8_0"
    assert fields["tensors"]["blk.1.ffn_down.weight"]["type"] == "F16"
    assert fields["tensors"]["blk.1.attn_v.weight"]["type"] == "Q4_0"
    # asking for a type that cannot hold the row is reported, not silently swapped
    report = read_tensor_types(stage / "model.gguf", "Q4_0", {"blk.0.attn_v.weight": "Q4_K"})
    assert report["mismatches"][0]["tensor"] == "blk.0.attn_v.weight"


def test_export_records_quality(tmp_path, tiny_llama):
    bundle = edgeq.export(tiny_llama, format="gguf", precision="F16", output=tmp_path / "b", eval_tokens=256, eval_ctx=64)
    quality = edgeq.inspect(bundle)["quality"]
    assert quality["kl"] < 1e-3 and quality["top1"] > 0.98 and quality["tokens"] >= 64


def test_quantized_export_reads_the_checkpoint_in_a_child_when_torch_is_not_loaded(tmp_path, tiny_llama):
    """The float GGUF is written by a child process, so torch's memory never sits beside the quantizer's."""
    import subprocess
    import sys

    code = ("import sys, edgeq; edgeq.export(sys.argv[1], format='gguf', precision='Q8_0', output=sys.argv[2], "
            "eval_tokens=0, progress=False); assert 'torch' not in sys.modules, 'torch was loaded in the exporting process'")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_llama), str(tmp_path / "b")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = edgeq.inspect(tmp_path / "b")
    assert manifest["precision"] == "Q8_0" and not manifest["mismatches"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.suffix in (".job", ".gguf")) == ["model.gguf"]


def test_amx_that_faults_is_found_once_and_llama_cpp_runs_without_it(tmp_path, tiny_llama, monkeypatch):
    """A CPU that advertises AMX gets one probe decode in a child; a child killed by a signal turns llama.cpp's extra
    buffer types off on this machine from then on, without probing again. F16 weights never reach AMX's kernels."""
    from edgeq.runtimes import llamacpp_amx

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(llamacpp_amx, "amx_advertised", lambda: True)
    quantized = edgeq.export(tiny_llama, format="gguf", precision="Q8_0", output=tmp_path / "q8", eval_tokens=0) / "model.gguf"
    float16 = edgeq.export(tiny_llama, format="gguf", precision="F16", output=tmp_path / "f16", eval_tokens=0) / "model.gguf"
    monkeypatch.setattr(llamacpp_amx, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert llamacpp_amx.extra_buffers_usable(float16)
    llamacpp_amx._amx_runs.cache_clear()
    assert not llamacpp_amx.extra_buffers_usable(quantized)
    monkeypatch.setattr(llamacpp_amx, "_PROBE", "raise SystemExit(0)")  # would say it works: not asked again
    llamacpp_amx._amx_runs.cache_clear()
    assert not llamacpp_amx.extra_buffers_usable(quantized)
    (tmp_path / "cache" / llamacpp_amx.VERDICTS).unlink()
    llamacpp_amx._amx_runs.cache_clear()
    assert llamacpp_amx.extra_buffers_usable(quantized)
    llamacpp_amx._amx_runs.cache_clear()
