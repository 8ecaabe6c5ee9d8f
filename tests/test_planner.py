"""The planner: a pure function of sensitivity and budget; sensitivity measured and cached; plans applied."""
from __future__ import annotations

import pytest

import edgeq
from edgeq.errors import EdgeqError
from edgeq.quant.knapsack import plan_precisions
from edgeq.quant.sensitivity import Sensitivity


def _sensitivity(**tensors) -> Sensitivity:
    """tensors: name → {precision: (bytes, dkl)}"""
    table = {name: {"shape": [1, 1], "kind": name, "measured": None,
                    "options": {p: {"bytes": b, "proxy": d, "dkl": d} for p, (b, d) in options.items()}}
             for name, options in tensors.items()}
    return Sensitivity("gguf", table, fixed_bytes=10, correlation=None, measured=0, key="test")


SENS = _sensitivity(
    sensitive={"q4": (100, 1.0), "q8": (200, 0.1), "f16": (400, 0.0)},
    robust={"q4": (100, 0.05), "q8": (200, 0.01), "f16": (400, 0.0)},
)


def test_budget_goes_to_the_sensitive_tensor():
    plan = plan_precisions(SENS, 10 + 300)
    assert plan.overrides() == {"sensitive": "q8", "robust": "q4"}
    assert plan.total_bytes <= 310 and plan.predicted_kl == pytest.approx(0.15)


def test_plan_never_exceeds_budget_and_uses_it():
    for budget in (210, 260, 310, 500, 610, 810, 5000):
        plan = plan_precisions(SENS, budget)
        assert plan.total_bytes <= budget
    assert plan_precisions(SENS, 810).overrides() == {"sensitive": "f16", "robust": "f16"}


def test_budget_too_small_is_an_error():
    with pytest.raises(EdgeqError, match="budget"):
        plan_precisions(SENS, 150)


def test_options_that_buy_nothing_are_never_chosen():
    sens = _sensitivity(t={"a": (100, 1.0), "b": (150, 0.9), "c": (200, 0.2), "d": (300, 0.5)})
    assert [plan_precisions(sens, 10 + budget).overrides()["t"] for budget in (100, 170, 250, 400)] == ["a", "b", "c", "c"]


def test_a_large_upgrade_that_buys_the_most_is_taken_over_many_small_ones():
    """Three small upgrades buy more ΔKL per byte, one large one more in all: the plan takes the large one. (Taking the
    best ratio first spends 150 bytes on the small ones and leaves the large one no room: ΔKL 1.0 instead of 0.3.)"""
    small = {"q4": (100, 0.1), "q8": (150, 0.0)}
    sens = _sensitivity(big={"q4": (100, 1.0), "q8": (1000, 0.0)}, s1=small, s2=small, s3=small)
    plan = plan_precisions(sens, 10 + 400 + 900)
    assert plan.overrides() == {"big": "q8", "s1": "q4", "s2": "q4", "s3": "q4"} and plan.predicted_kl == pytest.approx(0.3)
    assert plan.total_bytes <= 1310


@pytest.fixture(scope="module")
def tiny_plan(tiny_llama):
    return edgeq.plan(tiny_llama, format="gguf", bits_per_weight=6.0, progress=False)


def test_plan_on_tiny_model_is_measured_and_cached(tiny_llama, tiny_plan, monkeypatch):
    import edgeq.float_model

    assert tiny_plan.sensitivity["measured_tensors"] > 0
    assert tiny_plan.total_bytes <= tiny_plan.budget_bytes
    assert len({e.precision for e in tiny_plan.entries}) > 1  # a real mix, not one type

    def no_model(*args, **kwargs):
        raise AssertionError("re-planning must not load the model again")

    monkeypatch.setattr(edgeq.float_model, "load_float_model", no_model)
    again = edgeq.plan(tiny_llama, format="gguf", bits_per_weight=5.0, progress=False)
    assert again.sensitivity["key"] == tiny_plan.sensitivity["key"] and again.total_bytes < tiny_plan.total_bytes


def test_planned_export_applies_every_tensor(tiny_llama, tmp_path):
    bundle = edgeq.export(tiny_llama, format="gguf", bits_per_weight=6.0, output=tmp_path / "planned", eval_tokens=128, eval_ctx=64)
    manifest = edgeq.inspect(bundle)
    plan = manifest["plan"]
    written = manifest["tensors"]
    to_gguf = {"model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight", "model.embed_tokens.weight": "token_embd.weight"}
    for entry in plan["entries"]:
        if entry["tensor"] in to_gguf:
            assert written[to_gguf[entry["tensor"]]]["type"] == entry["precision"]
    assert manifest["mismatches"] == []
    from edgeq import registry
    from edgeq.intake import open_model
    from edgeq.quality import compare
    from edgeq.quant.calibration import CALIBRATION_TEXT, calibration_windows
    from edgeq.quant.sensitivity import MEASURE_TOKENS, measured_sequence

    source = open_model(tiny_llama)
    beside = (bundle / manifest["model_file"]).stat().st_size - sum(t["bytes"] for t in written.values())
    estimate = registry.formats.get("gguf").file_overhead(source, len(source.shapes()), 2048)
    assert abs(estimate - beside) <= 0.05 * beside, (estimate, beside)  # the vocabulary as written: --size spends the rest
    check = manifest["plan_check"]
    assert {"predicted_kl", "measured_kl", "ratio"} <= set(check) and check["sample_kl"] == manifest["quality"]["kl"]
    # measured on the very tokens the prediction was made on: the calibration sequence sensitivity measured
    sequence = measured_sequence(calibration_windows(source.chat_tokenizer(), CALIBRATION_TEXT, 4096, 512))
    assert len(sequence) == MEASURE_TOKENS and check["measured_on"] == f"same {MEASURE_TOKENS} tokens"
    assert 1 / 1.3 <= check["ratio"] <= 1.3 and "note" not in check  # nearest rounding: the round trip is the converter's
    reference = registry.runtimes.get(registry.REFERENCE_RUNTIME)(source, threads=1)
    again = compare(reference, edgeq.load(bundle, threads=1).engine, [sequence]).kl
    assert abs(again - check["measured_kl"]) <= 1e-6 + 1e-3 * again


def test_planned_onnx_export_writes_the_planned_type_of_every_matrix(tiny_llama, tmp_path):
    bundle = edgeq.export(tiny_llama, format="onnx", bits_per_weight=6.0, output=tmp_path / "planned-onnx", eval_tokens=64, eval_ctx=64)
    manifest = edgeq.inspect(bundle)
    planned = {e["tensor"]: e["precision"] for e in manifest["plan"]["entries"]}
    written = {name: t["type"] for name, t in manifest["tensors"].items()}
    assert len(set(planned.values())) > 1
    assert {name: written[name] for name in planned if name in written} == {n: p for n, p in planned.items() if n in written}
    assert len(set(planned) & set(written)) >= len(planned) - 1  # a tied lm_head is written from the embedding
    assert manifest["plan"]["total_bytes"] <= manifest["plan"]["budget_bytes"]


def test_planned_coreml_export_writes_the_planned_type_of_every_weight(tiny_llama, tmp_path):
    bundle = edgeq.export(tiny_llama, format="coreml", bits_per_weight=7.0, output=tmp_path / "planned-coreml", eval_tokens=0)
    manifest = edgeq.inspect(bundle)
    planned = {e["tensor"]: e["precision"] for e in manifest["plan"]["entries"]}
    written = {name: t["type"] for name, t in manifest["tensors"].items()}
    assert len(set(planned.values())) > 1 and manifest["mismatches"] == []
    assert len(set(planned) & set(written)) >= len(planned) - 1  # a tied lm_head is the embedding
    assert {n: written[n] for n in planned if n in written} == {n: p for n, p in planned.items() if n in written}
    # the planner's Core ML space prices and rounds each weight exactly as the package stores it, int4 weighted by the
    # importance matrix the plan was measured with (the converter is given it)
    from edgeq.converters.coreml.package import read_weights
    from edgeq.intake import open_model
    from edgeq import registry
    from edgeq.quant.calibration import CALIBRATION_TEXT
    from edgeq.quant.sensitivity import measure_sensitivity

    space, source = registry.formats.get("coreml").space(), open_model(tiny_llama)
    importance = measure_sensitivity(source, "coreml", CALIBRATION_TEXT, progress=False).importance  # cached by the export
    assert manifest["rounding"] == "importance-weighted"
    stored = read_weights(bundle / "model.mlpackage", list(written))
    for name, precision in planned.items():
        if name not in written:
            continue
        weight = source.tensor(name).float().numpy()
        assert manifest["tensors"][name]["bytes"] == space.nbytes(precision, weight.shape), name
        expected = space.round_trip(weight, precision, importance.get(name))
        assert (stored[name] == expected).all(), (name, precision)


def test_a_planned_export_rounded_by_gptq_prices_its_prediction_for_gptq(tiny_llama, tmp_path):
    """With calibration text a planned GGUF export rounds by GPTQ and its plan is priced for it; the plan check scales
    the simulated plan (nearest rounding's round trip) by what that pricing leaves of nearest's summed ΔKL, so the
    prediction it checks is GPTQ's, not nearest's."""
    from edgeq.quality import DEFAULT_TEXT

    calibration = tmp_path / "calibration.txt"
    calibration.write_text(DEFAULT_TEXT.read_text()[:8000])
    bundle = edgeq.export(tiny_llama, format="gguf", bits_per_weight=5.0, calibration=calibration, calibration_tokens=2048,
                          output=tmp_path / "planned", eval_tokens=128, eval_ctx=64)
    manifest = edgeq.inspect(bundle)
    check = manifest["plan_check"]
    assert manifest["rounding"] == "gptq" and "gptq_on_its_own_tokens" in check
    assert manifest["plan"]["sensitivity"]["priced_for"] == "gptq" and check["summed_kl"] == pytest.approx(manifest["plan"]["predicted_kl"], abs=1e-6)
    assert 0 < check["summed_kl"] < check["nearest_kl"]  # GPTQ leaves less than nearest's dKL
    priced = check["summed_kl"] / check["nearest_kl"]
    assert check["predicted_kl"] == pytest.approx(check["simulated_kl"] * priced, rel=1e-3)
    assert check["ratio"] == pytest.approx(check["measured_kl"] / check["predicted_kl"], rel=1e-2)


def test_the_plan_simulated_is_every_tensor_rounded_at_once(tiny_llama):
    """`simulate` rounds every chosen tensor at once by the format's round trip and leaves the model as it was."""
    import torch

    from edgeq.float_model import load_float_model
    from edgeq.intake import open_model
    from edgeq.quant.calibration import CALIBRATION_TEXT, calibration_windows
    from edgeq.quant.sensitivity import measure_sensitivity, measured_sequence, simulate

    source = open_model(tiny_llama)
    sensitivity = measure_sensitivity(source, "gguf", CALIBRATION_TEXT, progress=False)
    space = edgeq.registry.formats.get("gguf").space()
    choice = {name: next(iter(info["options"])) for name, info in sensitivity.tensors.items()}
    sequence = measured_sequence(calibration_windows(source.chat_tokenizer(), CALIBRATION_TEXT, 4096, 512))
    model = load_float_model(source)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    simulated = simulate(model, choice, space, sensitivity.importance, sequence)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    ids = torch.tensor([sequence])
    with torch.inference_mode():
        ref = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for name, precision in choice.items():
            p = model.get_parameter(name)
            p.data = torch.from_numpy(space.round_trip(p.data.float().numpy(), precision,
                                                       None if "embed" in name else sensitivity.importance.get(name)))
        out = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    assert simulated == pytest.approx(float((ref.exp() * (ref - out)).sum(-1).mean()), rel=1e-4) and simulated > 0
