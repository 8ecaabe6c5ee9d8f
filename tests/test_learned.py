"""Learned scales (`--effort max`): every format's grid states its levels as an affine map and stores a rescaled step
in its own fields, the learner keeps a layer's fitted scales only where they lower that layer's error, and an export
at `--effort max` writes them, says so, and refuses what it cannot do in one line."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import edgeq
from edgeq.converters.coreml.spec import gptq_grid as coreml_grid
from edgeq.converters.executorch.quant import ChannelGrid, GroupGrid
from edgeq.converters.gguf.blocks import GRIDS
from edgeq.converters.onnx.blocks import BlockGrid
from edgeq.quality import DEFAULT_TEXT
from edgeq.quant import learned
from edgeq.quant.gptq import gptq


GRID_CASES = {**{f"gguf-{name}": grid for name, grid in GRIDS.items()}, "onnx-int4": BlockGrid(4, 32),
              "onnx-int8": BlockGrid(8, 32), "executorch-8da4w": GroupGrid(4, 32), "coreml-int4": coreml_grid("int4"),
              "executorch-8da8w": ChannelGrid(8, torch.rand(8) * 0.01 + 1e-3)}


@pytest.mark.parametrize("case", sorted(GRID_CASES))
def test_every_grid_states_its_levels_and_stores_a_rescaled_step(case):
    """The affine levels (code · step − offset) at GPTQ's scales are the values the grid's own `round` gives, and a
    learned factor on each block's step is stored in the format's own fields with GPTQ's codes unchanged: what the
    learner fits is what the converter writes (GGUF's bytes are read back by gguf-py)."""
    grid = GRID_CASES[case]
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 512, generator=g) * 0.02
    weight[:, 5::41] *= 8
    x = torch.randn(2048, 512, generator=g)
    rounded, scales = gptq(weight, x.T @ x / len(x), grid)
    step, low, lo, hi = grid.affine(scales)
    inverse = torch.where(step == 0, torch.zeros_like(step), 1 / step)
    codes = ((rounded + low) * inverse).round().clamp(lo, hi)
    same_level = (codes * step - low - rounded).abs() <= 0.05 * step.abs() + 1e-9  # a grid may store the product in its scale's dtype
    assert bool(same_level.all())
    learner = learned._Scales(grid, rounded, scales)
    if grid.rescaled(scales, torch.ones(scales.shape[:2])) is None:
        assert case == "executorch-8da8w"  # one scale per row, fixed before GPTQ
        return
    with torch.no_grad():
        learner.factors.copy_(1 + 0.05 * torch.rand(learner.factors.shape, generator=g))
    fitted, stored = learner.final()
    new_step, new_low, _, _ = grid.affine(stored)
    assert not torch.equal(stored, scales)
    new_codes = ((fitted + new_low) * torch.where(new_step == 0, torch.zeros_like(new_step), 1 / new_step)).round()
    assert torch.equal(new_codes, codes)
    torch.testing.assert_close(fitted, learner.levels().detach(), rtol=2e-2, atol=1e-3 * float(weight.abs().max()))
    if case.startswith("gguf-"):
        name = case.removeprefix("gguf-")
        packed = grid.encode(fitted, stored)
        np.testing.assert_allclose(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[name]), fitted.numpy(), rtol=1e-6, atol=1e-9)


def test_learned_scales_are_kept_only_where_they_lower_the_error():
    """The fitted scales are taken only where they lower the layer's error over every window (not just the ones they
    were fitted on), and the output handed to the next layer is the chosen weights'."""
    grid = BlockGrid(4, 32)
    g = torch.Generator().manual_seed(2)
    linear = torch.nn.Linear(64, 32, bias=False)
    weight = torch.randn(32, 64, generator=g) * 0.05
    inputs = torch.randn(4, 16, 64, generator=g)
    target = inputs @ weight.T
    real = torch.ones(4, 16, dtype=torch.bool)
    rounded, scales = gptq(weight, (inputs.reshape(-1, 64).T @ inputs.reshape(-1, 64)) / 64, grid)

    def run(hidden, weights):
        return torch.func.functional_call(linear, weights, (hidden,))

    gptq_out = run(inputs, {"weight": rounded})
    kept = {"weight": (grid, rounded, scales)}
    weights, out = learned._refine(run, run, kept, (inputs, inputs[:2]), (target, target[:2]), gptq_out, (real, real[:2]))
    error = {name: float(((o - target) ** 2).sum(-1).mean()) for name, o in (("gptq", gptq_out), ("chosen", out))}
    assert error["chosen"] < error["gptq"] and not torch.equal(weights["weight"][1], scales), error
    torch.testing.assert_close(out, run(inputs, {"weight": weights["weight"][0]}))
    # a target GPTQ's own output meets exactly: no factor can lower an error of 0, so GPTQ's scales stay
    weights, out = learned._refine(run, run, kept, (inputs, inputs[:2]), (gptq_out, gptq_out[:2]), gptq_out, (real, real[:2]))
    assert out is gptq_out and weights["weight"][1] is scales


@pytest.mark.parametrize("fmt, precision", [("onnx", "int4"), ("gguf", "Q4_0")])
def test_effort_max_exports_learned_rounding_and_says_so(tmp_path, tiny_llama, fmt, precision):
    common = dict(format=fmt, precision=precision, calibration=DEFAULT_TEXT, calibration_tokens=2048, eval_tokens=256,
                  progress=False)
    standard = edgeq.inspect(edgeq.export(tiny_llama, output=tmp_path / "standard", **common))
    best = edgeq.inspect(edgeq.export(tiny_llama, output=tmp_path / "max", effort="max", **common))
    assert standard["rounding"] == "gptq" and best["rounding"] == "learned"
    assert best["quality"]["kl"] < 0.97 * standard["quality"]["kl"], (best["quality"], standard["quality"])


def test_effort_max_refuses_kept_adapters_and_short_text_in_one_line(tmp_path, tiny_llama, tiny_lora):
    short = tmp_path / "short.txt"
    short.write_text("def add(a, b):\n    return a + b\n" * 40)
    with pytest.raises(edgeq.EdgeqError, match="needs at least 2048 calibration tokens"):
        edgeq.export(tiny_llama, format="onnx", precision="int4", effort="max", calibration=short,
                     output=tmp_path / "short", eval_tokens=0, progress=False)
    with pytest.raises(edgeq.EdgeqError, match="--effort max.*kept adapters|kept adapters.*--effort max"):
        edgeq.export(tiny_llama, adapter=tiny_lora, keep_adapters=True, format="onnx", precision="int4", effort="max",
                     output=tmp_path / "kept", eval_tokens=0, progress=False)
    assert not (tmp_path / "short").exists() and not (tmp_path / "kept").exists()


def test_a_planned_export_takes_effort_max_with_the_plans_own_types(tmp_path, tiny_llama):
    common = dict(format="gguf", size="140KB", calibration=DEFAULT_TEXT, calibration_tokens=2048, progress=False)
    standard = edgeq.inspect(edgeq.export(tiny_llama, output=tmp_path / "standard", **common))
    best = edgeq.inspect(edgeq.export(tiny_llama, output=tmp_path / "max", effort="max", **common))
    assert standard["rounding"] == "gptq" and best["rounding"] == "learned"
    assert {n: t["type"] for n, t in best["tensors"].items()} == {n: t["type"] for n, t in standard["tensors"].items()}
    assert best["quality"]["kl"] < standard["quality"]["kl"], (best["quality"], standard["quality"])
