"""Rotations fused into the weights (edgeq.quant.rotation): the same function from other weights, read by every format."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgeq
from edgeq import registry
from edgeq.errors import EdgeqError
from edgeq.intake import open_model
from edgeq.quant.hadamard import hadamard, random_rotation
from edgeq.quant.rotation import rotated_source
from edgeq.runtimes.torch import TorchEngine

from conftest import build_lora, build_model
from test_backends import ARCHITECTURES, KL_BOUND, TEXT, _kl, _load

ROTATABLE = [a for a in ARCHITECTURES if a != "gemma3"]


def _with_biases(folder):
    """Random q/k/v biases (Qwen2's start at zero, which would hide a bias left out of R2)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    for name in tensors:
        if name.endswith("_proj.bias"):
            tensors[name] = torch.randn_like(tensors[name]) * 0.5
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


def _logits(folder):
    return np.array([TorchEngine(open_model(folder)).score(TEXT)])[0]


@pytest.mark.parametrize("n", [64, 576, 896, 1536])
def test_hadamard_matrices_of_the_hidden_sizes_of_small_models_are_orthogonal_and_flat(n):
    h, how = hadamard(n)
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64)) and set(np.unique(h)) == {-1, 1}, how
    q, how = random_rotation(n, np.random.default_rng(0))
    assert np.allclose(q @ q.T, np.eye(n), atol=1e-12) and np.allclose(np.abs(q), 1 / np.sqrt(n)), how
    q, how = random_rotation(100, np.random.default_rng(0))  # no Hadamard matrix of order 100 here: Haar, and it says so
    assert np.allclose(q @ q.T, np.eye(100), atol=1e-12) and "random orthogonal" in how


@pytest.mark.parametrize("architecture", ROTATABLE)
def test_rotated_model_computes_the_same_logits(architecture, tmp_path):
    cls, overrides = ARCHITECTURES[architecture]
    overrides = {**overrides, "norm_noise": 0.3}
    folder = _with_biases(build_model(tmp_path / architecture, cls, **overrides))
    source = open_model(folder)
    rotated, facts = rotated_source(source, seed=3)
    before, after = _logits(folder), _logits(rotated.path)
    assert np.abs(before - after).max() < 1e-3 * np.abs(before).max(), facts
    embed = source.tensor("model.embed_tokens.weight")
    assert not torch.allclose(rotated.tensor("model.embed_tokens.weight"), embed, atol=1e-3)  # it did rotate
    assert torch.allclose(rotated.tensor("model.layers.0.input_layernorm.weight"), torch.ones(1))  # gains folded
    if source.config.get("tie_word_embeddings"):  # a perturbed final norm cannot stay tied, and says so
        assert facts["tied_head"].startswith("untied") and not rotated.config["tie_word_embeddings"]


def test_a_tie_stays_when_the_final_norm_is_one_value(tmp_path):
    folder = build_model(tmp_path / "tied", tie_word_embeddings=True)  # gains all one value: the head may stay E·Q
    rotated, facts = rotated_source(open_model(folder))
    assert facts["tied_head"].startswith("kept") and rotated.config["tie_word_embeddings"]
    assert "lm_head.weight" not in rotated.index
    before, after = _logits(folder), _logits(rotated.path)
    assert np.abs(before - after).max() < 1e-3 * np.abs(before).max()


@pytest.mark.parametrize("fmt", registry.formats.names())
def test_every_format_reads_the_rotated_model(fmt, tmp_path):
    """A float export of the rotated model reproduces the unrotated model's torch logits: the converter read the
    rotated checkpoint as any other, and the function held; the manifest says what was done."""
    folder = build_model(tmp_path / "m", tie_word_embeddings=True, norm_noise=0.3)
    spec = registry.formats.get(fmt)
    bundle = edgeq.export(folder, format=fmt, precision=spec.float_precision, output=tmp_path / "b", eval_tokens=0, rotate="on")
    manifest = json.loads((bundle / "edgeq.json").read_text())
    record = manifest["rotation"]
    # at a float precision ONNX writes a tied table twice anyway, so it too writes the rotated head (its mix is for
    # one shared integer table: test_onnx_keeps_one_table_for_a_rotated_tied_model_at_the_cost_of_the_mix)
    assert record["applied"] and record["tied_head"].startswith("untied") and record["untied_head_bytes"] > 0
    ref = TorchEngine(open_model(folder)).score(TEXT)
    with _load(bundle, fmt) as lm:
        got = lm.engine.score(TEXT)
    assert _kl(ref, got).kl < KL_BOUND[fmt]


def test_onnx_keeps_one_table_for_a_rotated_tied_model_at_the_cost_of_the_mix(tmp_path):
    """A rotation unties the head (the final norm's gain); ONNX still stores one table, and the file grows by the
    hidden × hidden mix alone."""
    folder = build_model(tmp_path / "m", hidden_size=128, intermediate_size=256, tie_word_embeddings=True, norm_noise=0.3)
    sizes = {}
    for rotate in ("off", "on"):
        bundle = edgeq.export(folder, format="onnx", precision="int8", rounding="nearest", output=tmp_path / rotate,
                              eval_tokens=0, rotate=rotate)
        manifest = json.loads((bundle / "edgeq.json").read_text())
        assert "lm_head.weight" not in manifest["tensors"]  # the head reads the lookup's blocks
        sizes[rotate] = sum(t["bytes"] for t in manifest["tensors"].values())
    assert sizes["on"] - sizes["off"] == manifest["rotation"]["head_mix_bytes"] == 128 * 128 * 2
    ref = TorchEngine(open_model(folder)).score(TEXT)
    with _load(bundle, "onnx") as lm:
        assert _kl(ref, lm.engine.score(TEXT)).kl < 0.02  # int8 of the unrotated model: 0.006 (int4's 0.66 either way)


def test_a_head_mix_that_does_not_make_the_head_is_ignored(tmp_path, caplog):
    """The mix is read only where the weights agree with it: a folder's file is not trusted."""
    from edgeq.quant.rotation import HEAD_MIX_FILE, head_mix

    folder = build_model(tmp_path / "m", tie_word_embeddings=True, norm_noise=0.3)
    rotated, _ = rotated_source(open_model(folder))
    mix = head_mix(rotated)
    embed, head = rotated.tensor("model.embed_tokens.weight"), rotated.tensor("lm_head.weight")
    assert mix is not None and torch.allclose(embed @ torch.from_numpy(mix), head, atol=1e-5)
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in rotated.path.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    np.save(copy / HEAD_MIX_FILE, mix * 1.01)
    assert head_mix(open_model(copy)) is None and "is not the head" in caplog.text


@pytest.mark.parametrize("tied", [False, True])
def test_rotate_auto_measures_both_and_keeps_the_lower_at_the_same_size(tmp_path, tied):
    folder = build_model(tmp_path / "m", hidden_size=256, intermediate_size=512, norm_noise=0.3, tie_word_embeddings=tied)
    bundle = edgeq.export(folder, format="onnx", precision="int4", rounding="nearest", output=tmp_path / "b", eval_tokens=0,
                          rotate="auto", calibration_tokens=1024)
    manifest = json.loads((bundle / "edgeq.json").read_text())
    record = manifest["rotation"]
    kl = record["auto"]["kl"]
    assert kl["on"] > 0 and kl["off"] > 0
    size = record["auto"]["bytes"]
    if tied:  # the head untied (a perturbed final norm): a table of its own where ONNX shares one, which auto declines
        assert size["on"] > size["off"] > 0 and not record["applied"]
        assert ("declined" in record["auto"]) == (kl["on"] < kl["off"])
    else:
        assert size["on"] == size["off"] > 0
    assert record["applied"] == (kl["on"] < kl["off"] and size["on"] <= size["off"])
    assert (manifest["source"]["path"] != str(folder)) == record["applied"]  # the converter read the chosen weights


def test_what_a_rotation_cannot_preserve_is_refused_in_one_line(tmp_path):
    cls, overrides = ARCHITECTURES["gemma3"]
    gemma = build_model(tmp_path / "gemma", cls, **overrides)
    with pytest.raises(EdgeqError, match="cannot rotate Gemma3ForCausalLM: its post-attention") as info:
        edgeq.export(gemma, format="gguf", precision="F16", output=tmp_path / "g", eval_tokens=0, rotate="on")
    assert "\n" not in str(info.value)
    llama = build_model(tmp_path / "llama")
    lora = build_lora(tmp_path / "lora", llama)
    with pytest.raises(EdgeqError, match="--rotate with --keep-adapters") as info:
        edgeq.export(llama, format="gguf", precision="F16", adapters={"a": str(lora)}, keep_adapters=True,
                     output=tmp_path / "k", eval_tokens=0, rotate="on")
    assert "\n" not in str(info.value)
    with pytest.raises(EdgeqError, match="rotate='sideways' is not one of off, on, auto"):
        edgeq.export(llama, rotate="sideways")


def test_onnx_rotates_by_default_where_gptq_rounds_and_the_model_allows_it(tmp_path):
    """The format's default (`rotates_by_default`): ONNX rounded by GPTQ rotates; asked off, rounded to nearest, or a
    family a rotation cannot preserve, it does not, and the manifest says why not for the last."""
    llama = build_model(tmp_path / "llama")

    def rotation(folder, out, **options):
        bundle = edgeq.export(folder, output=tmp_path / out, eval_tokens=0, calibration_tokens=1024, **options)
        return json.loads((bundle / "edgeq.json").read_text()).get("rotation")

    record = rotation(llama, "default", format="onnx", precision="int4")
    assert record["asked"] == "default" and record["applied"]
    assert rotation(llama, "off", format="onnx", precision="int4", rotate="off") is None
    assert rotation(llama, "nearest", format="onnx", precision="int4", rounding="nearest") is None
    assert rotation(llama, "gguf", format="gguf", precision="Q8_0") is None
    cls, overrides = ARCHITECTURES["gemma3"]
    gemma = build_model(tmp_path / "gemma", cls, **overrides)
    record = rotation(gemma, "gemma-int8", format="onnx", precision="int8")
    assert record["asked"] == "default" and not record["applied"] and "post-attention" in record["why"]


def test_a_rotated_tied_head_typed_apart_from_its_table_is_written_as_its_own_tensor(tmp_path):
    """The mix pays only for one shared table: a head the request types apart is the rotated head itself, rounded by
    GPTQ like any linear (not the table's rows behind a mix)."""
    folder = build_model(tmp_path / "m", tie_word_embeddings=True, norm_noise=0.3)
    bundle = edgeq.export(folder, format="onnx", precision="int4", output=tmp_path / "b", eval_tokens=0, calibration_tokens=1024,
                          tensor_types={"lm_head.weight": "int4", "model.embed_tokens.weight": "int8"})
    manifest = json.loads((bundle / "edgeq.json").read_text())
    tensors, record = manifest["tensors"], manifest["rotation"]
    assert tensors["lm_head.weight"]["type"] == "int4" and tensors["model.embed_tokens.weight"]["type"] == "int8"
    assert "lm_head.mix.weight" not in tensors and record["untied_head_bytes"] == tensors["lm_head.weight"]["bytes"]
    assert record["applied"] and manifest["rounding"] == "gptq"


def test_a_large_16_bit_model_is_rotated_into_its_own_type(tmp_path, monkeypatch):
    """The float model every later step holds stays 16-bit (`stored_16bit`), as for the unrotated model; the rotated
    weights are that type's rounding of the rotation, near the same function."""
    from edgeq import float_model
    from test_float_model import _bf16_checkpoint

    folder = _bf16_checkpoint(tmp_path / "llama", "llama")
    monkeypatch.setattr(float_model, "FLOAT32_RESIDENT_BYTES", 0)
    rotated, facts = rotated_source(open_model(folder))
    assert facts["stored_as"] == "bfloat16" and set(rotated.dtypes().values()) == {"BF16"}
    assert float_model.stored_16bit(rotated) == torch.bfloat16
    before, after = _logits(folder), _logits(rotated.path)
    assert np.abs(before - after).max() < 0.05 * np.abs(before).max()  # 0.024 here: bf16's rounding, on a random model


def test_a_plan_for_onnx_prices_a_rotated_tied_table_once(tmp_path):
    """ONNX stores a rotated tied model's table once (the head reads it through the mix), so its plan gives the head the
    table's type, counts the table's bytes once, and adds the head's predicted error to the table's."""
    from edgeq.quant.calibration import CALIBRATION_TEXT, Calibration
    from edgeq.quant.sensitivity import measure_sensitivity
    from edgeq.planning import sensitivity_for

    folder = build_model(tmp_path / "m", hidden_size=128, intermediate_size=256, tie_word_embeddings=True, norm_noise=0.3)
    rotated, _ = rotated_source(open_model(folder))
    table, head = "model.embed_tokens.weight", "lm_head.weight"
    separate = measure_sensitivity(rotated, "onnx", CALIBRATION_TEXT, progress=False).tensors
    planned = sensitivity_for(rotated, "onnx", Calibration(rotated, None), progress=False).tensors
    assert head in separate and head not in planned and planned[table]["shares"] == [head]
    for precision, option in planned[table]["options"].items():
        assert option["bytes"] == separate[table]["options"][precision]["bytes"]
        # priced for GPTQ (ONNX's default): the nearest-rounding errors add up, each at its own gain
        assert option["nearest_dkl"] == pytest.approx(separate[table]["options"][precision]["dkl"] + separate[head]["options"][precision]["dkl"])
    assert registry.formats.get("gguf").stored_once(rotated) == {}  # GGUF writes the rotated head as its own tensor

    bundle = edgeq.export(folder, format="onnx", bits_per_weight=5.5, output=tmp_path / "b", eval_tokens=0,
                          calibration_tokens=1024, rotate="on")
    manifest = json.loads((bundle / "edgeq.json").read_text())
    entries = {e["tensor"]: e for e in manifest["plan"]["entries"]}
    assert entries[head]["precision"] == entries[table]["precision"] and entries[head]["bytes"] == 0
    assert head not in manifest["tensors"] and manifest["rotation"]["head_mix_bytes"] == 128 * 128 * 2  # one table
    assert manifest["mismatches"] == []


def test_gptq_rounds_a_shared_table_for_the_heads_input_through_the_mix(tmp_path):
    """ONNX stores a rotated tied model's table once, and the head reads it after the mix: GPTQ rounds that table for the
    head's input times the mix, below nearest rounding's output error, and puts the float model's table back."""
    from edgeq.converters.onnx.blocks import BlockGrid, dequantize
    from edgeq.quant.calibration import Calibration
    from edgeq.quant.gptq import quantize_model
    from edgeq.quant.rotation import head_mix

    folder = build_model(tmp_path / "m", hidden_size=128, intermediate_size=256, tie_word_embeddings=True, norm_noise=0.3)
    rotated, _ = rotated_source(open_model(folder))
    table = rotated.tensor("model.embed_tokens.weight").float()
    calibration = Calibration(rotated, None, 1024)
    gains = {}
    codes = quantize_model(calibration.model, calibration.windows, {"lm_head.weight": BlockGrid(4, 32)}, progress=False,
                           gains=gains, head_mix=head_mix(rotated))
    got = torch.from_numpy(dequantize(codes["lm_head.weight"], table.shape[1]))
    head = rotated.tensor("lm_head.weight").float()
    assert (got - table).norm() < 0.2 * table.norm() < (got - head).norm()  # the table's rows, not the rotated head's
    assert gains["lm_head.weight"] < 0.95
    assert torch.equal(calibration.model.model.embed_tokens.weight.float(), table)
