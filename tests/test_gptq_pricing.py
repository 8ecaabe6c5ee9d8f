"""Plans priced for the rounding the export uses: GPTQ's gain per kind and precision, measured on text it did not fit."""
from __future__ import annotations

import pytest

import edgeq
from edgeq.quant.gptq_pricing import FIT_TOKENS, JUDGE_TOKENS, priced_for_gptq, split_windows
from edgeq.quant.knapsack import plan_precisions
from edgeq.quant.sensitivity import Sensitivity


def test_windows_split_by_tokens_with_one_judged_at_least():
    windows = [[0] * 512 for _ in range(20)]
    fit, judge = split_windows(windows)
    assert len(fit) == 16 and len(judge) == 4 and 512 * len(fit) >= FIT_TOKENS * 512 * 20 / (FIT_TOKENS + JUDGE_TOKENS)
    assert split_windows([[1] * 900, [2] * 10]) == ([[1] * 900], [[2] * 10])
    assert split_windows([[1, 2]]) == ([[1, 2]], [[1, 2]])


def test_a_plan_priced_for_gptq_spends_its_bytes_where_gptq_leaves_the_error():
    """Two tensors alike at nearest rounding; GPTQ removes most of one's error and little of the other's, so the bytes
    that buy the most once GPTQ has rounded go to the other."""
    options = {"q4": {"bytes": 100, "proxy": 1.0, "dkl": 1.0}, "q8": {"bytes": 200, "proxy": 0.1, "dkl": 0.1}}
    tensors = {name: {"shape": [1, 1], "kind": kind, "measured": None, "options": {p: dict(o) for p, o in options.items()}}
               for name, kind in (("a", "attn"), ("b", "mlp"))}
    nearest = Sensitivity("gguf", tensors, fixed_bytes=0, correlation=None, measured=0, key="t",
                          gptq_gains={"attn": {"q4": 0.2, "q8": 0.5}, "mlp": {"q4": 0.9, "q8": 0.9}})
    priced = priced_for_gptq(nearest)
    assert priced.priced_for == "gptq" and nearest.priced_for == "nearest"
    assert priced.tensors["a"]["options"]["q4"] == {"bytes": 100, "proxy": 1.0, "dkl": pytest.approx(0.2), "nearest_dkl": 1.0}
    assert nearest.tensors["a"]["options"]["q4"]["dkl"] == 1.0  # the cached sensitivity is left as it was
    assert plan_precisions(priced, 300).overrides() == {"a": "q4", "b": "q8"}


def test_sensitivity_measures_what_gptq_leaves_and_a_gptq_export_plans_with_it(tiny_llama):
    from edgeq.intake import open_model
    from edgeq.planning import plan_from, sensitivity_for
    from edgeq.quant.calibration import Calibration

    source = open_model(tiny_llama)
    kinds = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    calibration = Calibration(source, None)
    gptq = sensitivity_for(source, "onnx", calibration, progress=False, rounding="gptq")
    nearest = sensitivity_for(source, "onnx", calibration, progress=False, rounding="nearest")
    gains = gptq.gptq_gains
    assert kinds <= set(gains) and "model.embed_tokens" not in gains  # the lookup is never rounded by GPTQ
    assert all("fp16" not in by_precision for by_precision in gains.values())  # float types keep their values
    int4 = sorted(by_precision["int4"] for by_precision in gains.values())
    assert 0 < int4[len(int4) // 2] < 1  # on text it did not fit, GPTQ still leaves less than nearest rounding
    assert nearest.priced_for == "nearest" and gptq.priced_for == "gptq"
    name = "model.layers.1.mlp.down_proj.weight"
    for precision, option in gptq.tensors[name]["options"].items():
        expected = nearest.tensors[name]["options"][precision]["dkl"] * gains["mlp.down_proj"].get(precision, 1.0)
        assert option["dkl"] == pytest.approx(expected) and option["nearest_dkl"] == nearest.tensors[name]["options"][precision]["dkl"]
    recorded = plan_from(None, gptq, calibration, budget=int(sum(max(o["bytes"] for o in t["options"].values()) for t in gptq.tensors.values()) * 0.4) + gptq.fixed_bytes).sensitivity
    assert recorded["priced_for"] == "gptq" and recorded["gptq_gains"] == gains


def test_plan_defaults_to_the_formats_own_rounding(tiny_llama):
    """GGUF rounds by GPTQ only on the user's own text: without it a plan is priced for llama.cpp's nearest rounding."""
    plan = edgeq.plan(tiny_llama, format="gguf", bits_per_weight=6.0, progress=False)
    assert plan.sensitivity["priced_for"] == "nearest" and "gptq_gains" not in plan.sensitivity


def test_edgeq_plan_says_what_rounding_it_priced(tiny_llama):
    from click.testing import CliRunner

    from edgeq.cli import main

    shown = CliRunner().invoke(main, ["plan", str(tiny_llama), "--format", "onnx", "--bits-per-weight", "6"])
    assert shown.exit_code == 0, shown.output
    assert "priced for GPTQ rounding: it leaves" in shown.output  # ONNX rounds by GPTQ on the built-in text too


def test_gains_stop_the_forward_after_the_deepest_layer_priced_with_the_same_result(tiny_llama):
    """Layers past the deepest one priced never run (a tied head is not priced), and what is measured does not move."""
    from edgeq import registry
    from edgeq.float_model import load_float_model
    from edgeq.intake import open_model
    from edgeq.quant.calibration import CALIBRATION_TEXT, WINDOW, calibration_windows
    from edgeq.quant.gptq_pricing import measure_gains

    source = open_model(tiny_llama)
    model = load_float_model(source)
    windows = calibration_windows(source.chat_tokenizer(), CALIBRATION_TEXT, 4 * WINDOW, WINDOW)
    space = registry.formats.get("onnx").space()
    last = len(model.model.layers) - 1
    first_q, last_q = "model.layers.0.self_attn.q_proj.weight", f"model.layers.{last}.self_attn.q_proj.weight"
    runs = []
    hook = model.model.layers[last].register_forward_hook(lambda *_: runs.append(1))
    try:
        early = measure_gains(model, {first_q: ["int4", "int8"]}, space, windows, {}, progress=False)
        assert not runs  # stopped after layer 0
        whole = measure_gains(model, {first_q: ["int4", "int8"], last_q: ["int4"]}, space, windows, {}, progress=False)
        assert runs  # the last layer priced: the whole stack ran
    finally:
        hook.remove()
    assert early[first_q] == whole[first_q] and set(early[first_q]) == {"int4", "int8"}
