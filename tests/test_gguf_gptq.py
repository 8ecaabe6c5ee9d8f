"""GPTQ in GGUF's own block types: the bytes are what gguf-py and ggml dequantize to GPTQ's values, each type's
rounding moves a layer's outputs less than llama.cpp's own importance-weighted quantizer, and a calibrated export
writes them into a file llama.cpp loads, with the quantizer's types, and a lower KL than llama.cpp's rounding."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import edgeq
from edgeq.converters.gguf.blocks import GRIDS, grid_for
from edgeq.converters.gguf.ggml_quants import round_trip
from edgeq.quality import DEFAULT_TEXT, QualityAccumulator
from edgeq.quant.calibration import calibration_windows
from edgeq.quant.gptq import gptq
from edgeq.intake import open_model
from edgeq.runtimes.torch import TorchEngine

from conftest import build_model


def _layer(cols: int, rows: int = 24, n: int = 4096, seed: int = 0):
    """A weight with a few large columns and correlated inputs with a few loud channels, as real layers have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols ** 0.5)
    x[:, :cols // 16] *= 4
    weight = torch.randn(rows, cols, generator=g) * 0.02
    weight[:, 3::37] *= 6
    return x, weight


@pytest.mark.parametrize("type_name", sorted(GRIDS))
def test_gptq_blocks_are_what_llama_cpp_dequantizes_and_beat_its_quantizer(type_name):
    x, weight = _layer(512)
    hessian = x.T @ x / len(x)
    grid = grid_for(type_name, 512)
    rounded, scales = gptq(weight, hessian, grid)
    packed = grid.encode(rounded, scales)
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert packed.dtype == np.uint8 and packed.shape == (24, 512 // block * size)
    np.testing.assert_allclose(gguf.quants.dequantize(packed, qtype), rounded.numpy(), rtol=1e-6, atol=1e-9)

    def output_error(w):
        return float(((x @ (weight - torch.as_tensor(w)).T) ** 2).mean())

    llama_cpp = round_trip(weight.numpy(), type_name, torch.diag(hessian).numpy())
    # measured (this data): 0.21-0.28 of llama.cpp's error in every type
    assert output_error(rounded) < 0.5 * output_error(llama_cpp), (output_error(rounded), output_error(llama_cpp))


def test_grids_exist_only_where_the_row_fits_the_type():
    assert grid_for("Q4_K", 512) is not None and grid_for("Q4_K", 576) is None
    assert grid_for("Q4_0", 576) is not None and grid_for("IQ4_NL", 512) is None and grid_for("F16", 512) is None


@pytest.fixture(scope="module")
def tiny_wide(tmp_path_factory):
    """Rows of 256 and 512, so K-quants hold them without falling back (the session's tiny model is 64 wide)."""
    return build_model(tmp_path_factory.mktemp("wide"), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2)


def _kl(model, bundle, windows):
    reference, acc = TorchEngine(open_model(model)), QualityAccumulator()
    with edgeq.load(bundle) as lm:
        for window in windows:
            acc.add(reference.score(window), lm.engine.score(window), window)
    return acc.result(ctx=len(windows[0])).kl


@pytest.mark.parametrize("precision", ["Q4_K_M", "Q4_0"])
def test_calibrated_gguf_export_rounds_by_gptq_in_llama_cpps_own_types(tmp_path, tiny_wide, precision):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(DEFAULT_TEXT.read_text()[:6000])
    held_out = calibration_windows(open_model(tiny_wide).chat_tokenizer(), DEFAULT_TEXT, 1024, 128)[-2:]
    common = dict(format="gguf", precision=precision, calibration=calibration, calibration_tokens=2048, eval_tokens=0, progress=False)
    gptq_bundle = edgeq.export(tiny_wide, output=tmp_path / "gptq", **common)
    nearest_bundle = edgeq.export(tiny_wide, output=tmp_path / "nearest", rounding="nearest", **common)
    ours, theirs = edgeq.inspect(gptq_bundle), edgeq.inspect(nearest_bundle)
    assert ours["rounding"] == "gptq" and theirs["rounding"] == "importance-weighted"
    assert {n: t["type"] for n, t in ours["tensors"].items()} == {n: t["type"] for n, t in theirs["tensors"].items()}
    assert ours["bits_per_weight"] == theirs["bits_per_weight"] and not ours["mismatches"]
    if precision == "Q4_K_M":
        assert {"Q4_K", "Q6_K"} <= {t["type"] for t in ours["tensors"].values()}
    # the layers' bytes changed, the embedding's (no GPTQ for a lookup) did not
    a, b = (gguf.GGUFReader(bundle / "model.gguf") for bundle in (gptq_bundle, nearest_bundle))
    data = {t.name: t.data for t in b.tensors}
    same = {t.name for t in a.tensors if np.array_equal(t.data, data[t.name])}
    assert "token_embd.weight" in same and "blk.0.ffn_down.weight" not in same and "output.weight" not in same
    kl = {name: _kl(tiny_wide, bundle, held_out) for name, bundle in (("gptq", gptq_bundle), ("nearest", nearest_bundle))}
    # measured: Q4_K_M 1.17 vs 1.63, Q4_0 1.58 vs 2.27 (a random model: far from its float self at 4 bits)
    assert kl["gptq"] < 0.8 * kl["nearest"], kl


def test_gguf_rounding_choices(tmp_path, tiny_llama):
    plain = edgeq.inspect(edgeq.export(tiny_llama, format="gguf", precision="Q8_0", output=tmp_path / "p", eval_tokens=0))
    assert plain["rounding"] == "nearest" and plain["calibration"] is None  # no text given: llama.cpp's own, no model load
    asked = edgeq.inspect(edgeq.export(tiny_llama, format="gguf", precision="Q8_0", rounding="gptq", output=tmp_path / "g",
                                       eval_tokens=0))
    assert asked["rounding"] == "gptq" and asked["calibration"]["text"] == "built-in calibration text"
    assert edgeq.inspect(edgeq.export(tiny_llama, format="gguf", precision="F16", output=tmp_path / "f", eval_tokens=0))["rounding"] is None


def test_effort_chooses_the_rounding_and_refuses_in_one_line_what_it_cannot_do(tmp_path, tiny_llama):
    def export(name, **options):
        return edgeq.export(tiny_llama, format="gguf", precision="Q8_0", output=tmp_path / name, eval_tokens=0, progress=False, **options)

    assert edgeq.inspect(export("fast", effort="fast", calibration=DEFAULT_TEXT))["rounding"] == "importance-weighted"
    with pytest.raises(edgeq.EdgeqError, match="both choose the rounding"):
        export("both", effort="fast", rounding="gptq")
    short = tmp_path / "short.txt"
    short.write_text("def add(a, b):\n    return a + b\n" * 8)
    with pytest.raises(edgeq.EdgeqError, match=r"--effort max rounds by GPTQ and learned offsets and needs at least 2048 calibration tokens"):
        export("max", effort="max", calibration=short)
    with pytest.raises(edgeq.EdgeqError, match=r"needs at least 1024 calibration tokens; .*short.txt gave \d+: give more text"):
        export("short", calibration=short)
    assert not any((tmp_path / name).exists() for name in ("max", "both", "short"))


def test_types_without_a_grid_keep_llama_cpps_importance_weighted_bytes(tmp_path, tiny_llama):
    """Q5_K_M on 64-wide rows falls back to Q5_1, which has no grid: those tensors are llama.cpp's, with the
    importance matrix (measured for them), and the Q8_0 / Q6_K ones are GPTQ's."""
    common = dict(format="gguf", precision="Q5_K_M", calibration=DEFAULT_TEXT, calibration_tokens=2048, eval_tokens=0, progress=False)
    ours = edgeq.export(tiny_llama, output=tmp_path / "gptq", **common)
    theirs = edgeq.export(tiny_llama, output=tmp_path / "nearest", rounding="nearest", **common)
    manifest = edgeq.inspect(ours)
    assert manifest["rounding"] == "gptq" and manifest["gptq_tensors"] > 0
    types = {n: t["type"] for n, t in manifest["tensors"].items()}
    a, b = ({t.name: t.data for t in gguf.GGUFReader(bundle / "model.gguf").tensors} for bundle in (ours, theirs))
    q51 = [n for n, t in types.items() if t == "Q5_1"]
    assert q51 and all(np.array_equal(a[n], b[n]) for n in q51)
    assert any(not np.array_equal(a[n], b[n]) for n, t in types.items() if t in ("Q8_0", "Q6_K", "Q5_0"))


def test_kept_adapters_get_a_base_rounded_for_their_activations_too(tmp_path, tiny_llama, tiny_lora):
    bundle = edgeq.export(tiny_llama, format="gguf", precision="Q8_0", adapters={"a": tiny_lora}, keep_adapters=True,
                          calibration=DEFAULT_TEXT, calibration_tokens=2048, output=tmp_path / "kept", eval_tokens=0, progress=False)
    manifest = edgeq.inspect(bundle)
    assert manifest["rounding"] == "gptq" and manifest["gptq_tensors"] > 0
    assert [a["name"] for a in manifest["adapters"]] == ["a"]
    with edgeq.load(bundle) as lm:
        assert lm.engine.score([0, 5, 17, 42]).shape[0] == 4
