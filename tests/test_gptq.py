"""GPTQ: it lowers a layer's output error below importance-weighted rounding, stays on the format's grid,
runs layer by layer over a real transformers model without changing it, and the ONNX export uses it; with
adapters kept apart, the shared base is rounded for the adapted models' activations too."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import edgeq
from edgeq.hashing import sha256_file
from edgeq.converters.onnx.blocks import BlockGrid, dequantize, quantize_blocks
from edgeq.quality import DEFAULT_TEXT, QualityAccumulator
from edgeq.quant.gptq import _Lora, gptq, quantize_model
from edgeq.quant.calibration import calibration_windows
from edgeq.intake import open_model
from edgeq.float_model import load_float_model
from edgeq.runtimes.torch import TorchEngine
from edgeq.adapter_set import open_adapters


def _correlated_inputs(cols: int, n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    return torch.randn(n, cols, generator=g) @ mix + 0.1 * torch.randn(n, cols, generator=g)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_moves_outputs_less_than_rounding_and_stays_on_the_grid(bits):
    x = _correlated_inputs(128)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian = x.T @ x / len(x)
    grid = BlockGrid(bits, 32)
    rounded, scales = gptq(weight, hessian, grid)
    nearest = torch.from_numpy(dequantize(quantize_blocks(weight, bits, 32, torch.diag(hessian).numpy()), 128))

    def output_error(w):
        return float(((x @ (weight - w).T) ** 2).mean())

    assert output_error(rounded) < 0.8 * output_error(nearest)
    stored = grid.encode(rounded, scales)
    assert stored.scales.shape == (48, 4)
    np.testing.assert_array_equal(dequantize(stored, 128), rounded.numpy())  # what GPTQ chose is what gets written


def test_the_gain_is_gptqs_output_error_over_nearest_roundings_on_the_same_grid():
    """What a plan prices GPTQ with: tr(ΔW H ΔWᵀ) of GPTQ's rounding over that of the grid's own nearest rounding
    (the same scale search, no error feedback), from the upper triangle GPTQ keeps of H."""
    from edgeq.quant.gptq import gain

    x = _correlated_inputs(128)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    hessian = x.T @ x / len(x)
    grid = BlockGrid(4, 32)
    rounded, _ = gptq(weight, hessian, grid)
    nearest = torch.from_numpy(dequantize(quantize_blocks(weight, 4, 32, torch.diag(hessian).numpy()), 128))

    def output_error(w):
        return float(((x @ (weight - w).T) ** 2).mean())

    measured = gain(weight, rounded, torch.triu(hessian), grid)
    assert measured == pytest.approx(output_error(rounded) / output_error(nearest), rel=0.05)  # the converter's nearest: its own search
    assert 0 < measured < 0.8


def test_with_few_tokens_per_input_gptq_is_damped_more_and_keeps_more_of_its_gain_on_other_tokens():
    """A Hessian from 2 tokens per column of a gated input (what a down_proj reads: heavy-tailed) fits those tokens' own
    correlations; `damping` gives it more damping, which leaves less output error on tokens GPTQ did not see
    (`gain`'s `judged_on`) than the paper's 0.01 does."""
    from edgeq.quant.gptq import DAMPING, WIDE_DAMPING, inverse_hessian_factor, damping, gain

    cols = 256
    x = _correlated_inputs(cols, n=8192, seed=3)
    x = torch.nn.functional.silu(2 * x) * x
    fit, judged = x[:2 * cols], x[2 * cols:]
    weight = torch.randn(64, cols, generator=torch.Generator().manual_seed(4)) * 0.05
    hessian, other = torch.triu(fit.T @ fit / len(fit)), torch.triu(judged.T @ judged / len(judged))
    assert damping(len(fit), cols) == WIDE_DAMPING > DAMPING == damping(8 * cols, cols)
    grid = BlockGrid(4, 32)
    kept = {d: gain(weight, gptq(weight, hessian, grid, inverse_hessian_factor(hessian, d))[0], hessian, grid, other)
            for d in (DAMPING, damping(len(fit), cols))}
    assert kept[WIDE_DAMPING] < 0.95 * kept[DAMPING]


def test_gptq_survives_inputs_the_calibration_never_activates():
    x = _correlated_inputs(64)
    x[:, 5] = 0
    weight = torch.randn(16, 64) * 0.05
    rounded, _ = gptq(weight, x.T @ x / len(x), BlockGrid(4, 32))
    assert torch.isfinite(rounded).all() and (rounded - weight).abs().max() < 0.05


def test_a_tall_weight_rounded_in_row_chunks_is_rounded_as_well(monkeypatch):
    """Rows are independent given the Hessian, so a head of 128-262k rows goes in chunks (its float32 copies are a
    chunk's); the float sums' order changes a near tie here and there, not the quality."""
    import edgeq.quant.gptq as module

    x = _correlated_inputs(128)
    weight = torch.randn(300, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    hessian = x.T @ x / len(x)
    whole, _ = gptq(weight, hessian, BlockGrid(4, 32))
    monkeypatch.setattr(module, "ROW_CHUNK", 64)
    chunked, scales = gptq(weight, hessian, BlockGrid(4, 32))
    assert scales.shape == (300, 4)

    def output_error(w):
        return float(((x @ (weight - w).T) ** 2).mean())

    assert output_error(chunked) == pytest.approx(output_error(whole), rel=0.02)


def test_quantize_model_covers_what_was_asked_and_leaves_the_model_as_it_was(tiny_llama):
    source = open_model(tiny_llama)
    model = load_float_model(source)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = calibration_windows(source.chat_tokenizer(), DEFAULT_TEXT, 512, 128)
    grids = {f"model.layers.{i}.{n}.weight": BlockGrid(4, 32) for i in range(2)
             for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")}
    grids["model.layers.1.self_attn.v_proj.weight"] = BlockGrid(8, 32)  # shares q/k's input, not their grid
    grids["lm_head.weight"] = BlockGrid(4, 32)
    results = quantize_model(model, windows, grids, progress=False)
    assert set(results) == set(grids)
    assert results["model.layers.1.self_attn.v_proj.weight"].bits == 8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for name, stored in results.items():
        assert stored.scales.shape[0] == model.get_parameter(name).shape[0]


class _FakeVariant:
    """A LoRA given by its factors, as `quantize_model` reads a kept adapter."""

    def __init__(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]):
        self._factors = factors

    def targets(self) -> list[str]:
        return sorted(self._factors)

    def factors(self, weight: str):
        return self._factors[weight]


def _logits(model, windows, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on `windows` with `weights` put in its place for the call (the model is left as it was)."""
    originals = {name: model.get_parameter(name).data for name in weights}
    try:
        for name, weight in weights.items():
            model.get_parameter(name).data = weight
        with torch.no_grad():
            return torch.cat([model(input_ids=torch.tensor([w])).logits[0] for w in windows])
    finally:
        for name, weight in originals.items():
            model.get_parameter(name).data = weight


def _all_linears(model) -> dict:
    return {f"{n}.weight": BlockGrid(4, 32) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_the_lora_hooks_compute_what_the_merged_model_does(tiny_llama):
    source = open_model(tiny_llama)
    model = load_float_model(source)
    windows = calibration_windows(source.chat_tokenizer(), DEFAULT_TEXT, 256, 128)
    g = torch.Generator().manual_seed(3)
    factors = {}
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        rows, cols = model.get_parameter(name).shape
        factors[name] = (torch.randn(rows, 2, generator=g) * 0.3, torch.randn(2, cols, generator=g) * 0.3, 2.0)
    merged = {name: model.get_parameter(name).data + s * b @ a for name, (b, a, s) in factors.items()}
    with _Lora(_FakeVariant(factors)).on({f"{n}.weight": m for n, m in model.named_modules()}):
        hooked = _logits(model, windows, {})
    torch.testing.assert_close(hooked, _logits(model, windows, merged), rtol=1e-4, atol=1e-4)
    assert not any(m._forward_hooks for m in model.modules())  # switched off again
    results = quantize_model(model, windows, _all_linears(model), progress=False, variants=[_FakeVariant(factors)])
    assert set(results) == set(_all_linears(model))  # an adapted embedding starts its own stream


def test_gptq_with_a_kept_adapter_rounds_the_shared_base_for_the_adapted_model_too(tiny_llama, tiny_lora):
    """The base rounded for the base's and the adapter's activations, with the float adapter on, is closer to the
    merged float model than the base rounded for its own activations alone; the base itself pays a little."""
    source = open_model(tiny_llama)
    model = load_float_model(source)
    windows = calibration_windows(source.chat_tokenizer(), DEFAULT_TEXT, 512, 128)
    grids = _all_linears(model)
    [adapter] = open_adapters(open_model(tiny_llama), {"a": tiny_lora}, "onnx")
    deltas = {}
    for name in adapter.targets():
        b, a, scaling = adapter.factors(name)
        deltas[name] = scaling * b @ a
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alone = quantize_model(model, windows, grids, progress=False)
    shared = quantize_model(model, windows, grids, progress=False, variants=[adapter])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())

    adapted_float = _logits(model, windows, {n: before[n] + d for n, d in deltas.items()})
    base_float = _logits(model, windows, {})
    errors = {}
    for label, results in (("alone", alone), ("shared", shared)):
        rounded = {n: torch.from_numpy(dequantize(q, model.get_parameter(n).shape[1])) for n, q in results.items()}
        adapted = _logits(model, windows, {n: w + deltas.get(n, 0) for n, w in rounded.items()})
        errors[label] = (float(((adapted - adapted_float) ** 2).mean()), float(((_logits(model, windows, rounded) - base_float) ** 2).mean()))
    # measured: adapted 0.443 vs 0.629, base 0.315 vs 0.282
    assert errors["shared"][0] < 0.85 * errors["alone"][0], errors
    assert errors["shared"][1] < 1.5 * errors["alone"][1], errors
    assert sum(errors["shared"]) < sum(errors["alone"]), errors

    # an adapter that changes nothing adds a copy of the base's stream: the same Hessians up to the order of the
    # float sums. GPTQ carries a near tie along its row and into every later linear's input, so the codes are not
    # the same ones (float32 noise moves them 60-75% as far as the real adapter does), but the rounding is as good.
    zero = _FakeVariant({n: (torch.zeros_like(b), a, s) for n in adapter.targets() for b, a, s in [adapter.factors(n)]})
    same = quantize_model(model, windows, grids, progress=False, variants=[zero])
    rounded = {n: torch.from_numpy(dequantize(q, model.get_parameter(n).shape[1])) for n, q in same.items()}
    assert float(((_logits(model, windows, rounded) - base_float) ** 2).mean()) == pytest.approx(errors["alone"][1], rel=0.05)


def test_onnx_int4_rounds_by_gptq_on_the_calibration_text_and_beats_nearest(tmp_path, tiny_llama):
    source = open_model(tiny_llama)
    held_out = calibration_windows(source.chat_tokenizer(), DEFAULT_TEXT, 1024, 128)[-2:]
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(DEFAULT_TEXT.read_text()[:6000])
    gptq_bundle = edgeq.export(tiny_llama, format="onnx", precision="int4", calibration=calibration, calibration_tokens=2048,
                               output=tmp_path / "gptq", eval_tokens=0, progress=False)
    nearest_bundle = edgeq.export(tiny_llama, format="onnx", precision="int4", rounding="nearest", tensor_types={"lm_head.weight": "int4"},
                                  output=tmp_path / "nearest", eval_tokens=0, progress=False)
    report = edgeq.inspect(gptq_bundle)
    assert report["rounding"] == "gptq" and report["calibration"] == {"text": str(calibration), "sha256": sha256_file(calibration), "tokens": 2048}
    assert edgeq.inspect(nearest_bundle)["rounding"] == "nearest" and edgeq.inspect(nearest_bundle)["calibration"] is None
    assert report["tensors"]["lm_head.weight"]["type"] == "int4"  # GPTQ makes a 4-bit lm_head affordable
    assert report["tensors"]["model.embed_tokens.weight"]["type"] == "int8"
    reference = TorchEngine(source)
    kl = {}
    for name, bundle in (("gptq", gptq_bundle), ("nearest", nearest_bundle)):
        acc = QualityAccumulator()
        with edgeq.load(bundle) as lm:
            for window in held_out:
                acc.add(reference.score(window), lm.engine.score(window), window)
        kl[name] = acc.result(ctx=128).kl
    assert kl["gptq"] < 0.8 * kl["nearest"], kl


def test_onnx_rounding_defaults_and_choices(tmp_path, tiny_llama):
    default = edgeq.inspect(edgeq.export(tiny_llama, format="onnx", precision="int4", output=tmp_path / "d", eval_tokens=0))
    assert default["rounding"] == "gptq" and default["calibration"]["text"] == "built-in calibration text"
    nearest = edgeq.inspect(edgeq.export(tiny_llama, format="onnx", precision="int4", rounding="nearest", output=tmp_path / "n", eval_tokens=0))
    assert nearest["tensors"]["lm_head.weight"]["type"] == "int8"  # rounded alone, a 4-bit lm_head costs too much
    weighted = edgeq.inspect(edgeq.export(tiny_llama, format="onnx", precision="int8", rounding="nearest", calibration=DEFAULT_TEXT,
                                          output=tmp_path / "w", eval_tokens=0))
    assert weighted["rounding"] == "importance-weighted" and weighted["calibration"]["text"] == str(DEFAULT_TEXT)
    assert edgeq.inspect(edgeq.export(tiny_llama, format="onnx", precision="fp16", output=tmp_path / "f", eval_tokens=0))["rounding"] is None
    with pytest.raises(edgeq.EdgeqError, match="does not apply to the gguf format"):
        edgeq.export(tiny_llama, format="gguf", precision="Q8_0", mobile=True, output=tmp_path / "g", eval_tokens=0)
    assert not (tmp_path / "g").exists()


@pytest.mark.integration
def test_smollm2_int4_gptq_beats_nearest_rounding_with_one_tied_table(tmp_path):
    """On the real (tied) model: GPTQ's bundle (the INT4 recipe) stays below nearest rounding's KL in no more bytes;
    both store the table once for the lookup and the head, GPTQ's at 4 bits in blocks of 16, nearest's at 8."""
    from edgeq.default_model import default_model_path

    model = default_model_path(progress=False)
    source = open_model(model)
    held_out = calibration_windows(source.chat_tokenizer(), DEFAULT_TEXT, 1024, 256)[:2]  # not the built-in calibration text
    reference = TorchEngine(source)
    kl, weight_bytes = {}, {}
    for rounding in ("gptq", "nearest"):
        bundle = edgeq.export(model, format="onnx", precision="int4", rounding=rounding, output=tmp_path / rounding,
                              eval_tokens=0, progress=False)
        acc = QualityAccumulator()
        with edgeq.load(bundle, n_ctx=512) as lm:
            for window in held_out:
                acc.add(reference.score(window), lm.engine.score(window), window)
        kl[rounding] = acc.result(ctx=256).kl
        tensors = edgeq.inspect(bundle)["tensors"]
        assert "lm_head.weight" not in tensors
        assert tensors["model.embed_tokens.weight"]["type"] == {"gptq": "int4-block16", "nearest": "int8"}[rounding]
        weight_bytes[rounding] = sum(t["bytes"] for t in tensors.values())
    assert kl["gptq"] < kl["nearest"], kl
    assert weight_bytes["gptq"] <= weight_bytes["nearest"], weight_bytes
