"""The float reference of a large 16-bit checkpoint stays 16-bit in memory and computes exactly as float32 does."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import build_model
from edgeq import float_model
from edgeq.converters.onnx.blocks import BlockGrid
from edgeq.intake import open_model
from edgeq.quant.gptq import quantize_model
from edgeq.quant.importance import compute_importance
from test_backends import ARCHITECTURES, TEXT


def _bf16_checkpoint(folder, architecture):
    cls, overrides = ARCHITECTURES[architecture]
    build_model(folder, cls, **overrides)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_large_16_bit_model_keeps_16_bits_and_computes_as_float32(tmp_path, monkeypatch, architecture):
    folder = _bf16_checkpoint(tmp_path / architecture, architecture)
    ids = torch.tensor([TEXT])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits
        assert float_model.load_float_model(open_model(folder)).dtype == torch.float32  # small: float32 as always
        monkeypatch.setattr(float_model, "FLOAT32_RESIDENT_BYTES", 0)
        lean = float_model.load_float_model(open_model(folder))
        assert {p.dtype for p in lean.parameters()} == {torch.bfloat16}
        got = lean(input_ids=ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert {p.dtype for p in lean.parameters()} == {torch.bfloat16}  # the float32 copies were per call only


def test_calibration_on_a_16_bit_model_equals_float32(tmp_path, monkeypatch):
    folder = _bf16_checkpoint(tmp_path / "llama", "llama")
    windows = [TEXT, TEXT[::-1]]
    full = float_model.load_float_model(open_model(folder))
    grids = {f"{name}.weight": BlockGrid(4, 32) for name, m in full.named_modules()
             if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}
    expected_importance, expected_rounded = compute_importance(full, windows), quantize_model(full, windows, grids)
    monkeypatch.setattr(float_model, "FLOAT32_RESIDENT_BYTES", 0)
    lean = float_model.load_float_model(open_model(folder))
    importance, rounded = compute_importance(lean, windows), quantize_model(lean, windows, grids)
    for name, values in expected_importance.items():
        assert importance[name] == pytest.approx(values, rel=1e-5, abs=1e-9)
    for name, q in expected_rounded.items():
        assert (rounded[name].data != q.data).mean() < 1e-3, name  # GPTQ's column order may flip a tie or two
        assert rounded[name].scales == pytest.approx(q.scales, rel=1e-3)
    assert {p.dtype for p in lean.parameters()} == {torch.bfloat16}  # GPTQ put the stored weights back


def test_an_export_that_would_not_fit_is_refused_up_front_with_the_estimate(tmp_path, monkeypatch, tiny_llama):
    import psutil

    import edgeq
    from edgeq.errors import EdgeqError

    text = tmp_path / "notes.txt"
    text.write_text("Calibration notes. " * 50)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=1 << 20))
    with pytest.raises(EdgeqError, match=r"^this export loads the float model for GPTQ rounding, the importance matrix of --calibration: "
                                         r"about 0\.\d GiB, and 0\.0 GiB is free; free memory"):
        edgeq.export(tiny_llama, format="gguf", precision="Q4_0", calibration=text, eval_tokens=0, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_importance_matrix_lets_the_float_model_go_and_the_export_records_its_text(tmp_path, tiny_llama):
    import json

    import edgeq
    from edgeq.quant.calibration import Calibration

    text = tmp_path / "notes.txt"
    text.write_text("Calibration notes about kettles and lamps. " * 80)
    calibration = Calibration(open_model(tiny_llama), text, tokens=256)
    importance = calibration.importance()
    assert not calibration.reference.loaded and len(importance) == 2 * 7 + 1  # 7 linears a layer and the head
    bundle = edgeq.export(tiny_llama, format="gguf", precision="Q8_0", calibration=text, eval_tokens=64, output=tmp_path / "out")
    manifest = json.loads((bundle / "edgeq.json").read_text())
    assert manifest["calibration"]["text"] == str(text)
    assert manifest["quality"]["kl"] < 0.05  # the reference loaded again for the quality check
