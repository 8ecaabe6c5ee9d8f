"""`edgeq.plan()`: sensitivity (cached) + a budget from the device, a size or bits per weight → Plan."""
from __future__ import annotations

from pathlib import Path

from . import registry
from .quant.budget import budget_bytes
from .quant.calibration import Calibration
from .quant.knapsack import Plan, plan_precisions
from .quant.gptq_pricing import priced_for_gptq
from .quant.sensitivity import measure_sensitivity, stored_once


def plan(model: str | Path | None = None, *, revision: str | None = None, device: str | Path | None = None, format: str = registry.DEFAULT_FORMAT,
         size: str | int | None = None, bits_per_weight: float | None = None, adapter: str | Path | None = None,
         calibration: str | Path | None = None, kv_cache: str | None = None, progress: bool | None = None) -> Plan:
    """Chooses a precision per tensor for `model` (a folder, hub id at `revision`, or GGUF file, as `export` takes)
    on `device` (or within `size` / `bits_per_weight`).

    Sensitivity is measured once per model, calibration text and format, then cached, so planning
    the same model for another device takes seconds. `kv_cache` is the runtime's KV cache type (a format
    that has several, GGUF: f16, q8_0, q4_0); "auto" (the default on a device) chooses it with the weights.
    """
    from edgeq.devices import load_device

    from .intake import open_model

    if model is None:
        from .default_model import default_model_path

        model = default_model_path(progress=progress)
    registry.formats.get(format)  # an unknown format fails here, with the known ones
    if bits_per_weight is not None:
        from .validate import BITS_PER_WEIGHT

        BITS_PER_WEIGHT.check("bits_per_weight", bits_per_weight)
    source = open_model(model, adapter=adapter, revision=revision, progress=progress)
    profile = load_device(device) if device else None
    return plan_for(source, format, Calibration(source, calibration), profile=profile, size=size,
                    bits_per_weight=bits_per_weight, kv_cache=kv_cache, progress=progress)


def plan_for(source, fmt: str, calibration: Calibration, *, profile=None, size=None, bits_per_weight=None, kv_cache=None,
             progress=None) -> Plan:
    """The plan; the importance matrix it was measured with goes to `calibration`, for the converter to round with."""
    sensitivity = sensitivity_for(source, fmt, calibration, progress)
    if profile is not None and size is None and bits_per_weight is None:
        from .quant.kv_plan import plan_with_cache

        return plan_from(plan_with_cache(sensitivity, source, fmt, calibration, profile, kv_cache), sensitivity, calibration)
    budget = budget_for(sensitivity, source, fmt, profile=profile, size=size, bits_per_weight=bits_per_weight)
    return plan_from(None, sensitivity, calibration, budget=budget)


def sensitivity_for(source, fmt: str, calibration: Calibration, progress=None, rounding: str | None = None):
    """Sensitivity on the calibration data (cached by its hash), priced for GPTQ where the export at `rounding` (None:
    the format's default) rounds by it, with the tensors the format stores as one planned as one
    (`FormatSpec.stored_once`); its importance matrix goes to `calibration`."""
    spec = registry.formats.get(fmt)
    sensitivity = measure_sensitivity(source, fmt, calibration.text, progress=progress)
    calibration.adopt_importance(sensitivity.importance)
    if spec.rounds_by_gptq(spec.planned_precision, rounding, calibration.given):
        sensitivity = priced_for_gptq(sensitivity)
    return stored_once(sensitivity, spec.stored_once(source))


def budget_for(sensitivity, source, fmt: str, *, profile=None, size=None, bits_per_weight=None) -> int:
    return budget_bytes(sensitivity, source.config, fmt, profile=profile, size=size, bits_per_weight=bits_per_weight)


def plan_from(plan: Plan | None, sensitivity, calibration: Calibration, *, budget: int | None = None) -> Plan:
    """`plan` (or the plan for `budget`) with a record of how its predictions were made."""
    result = plan if plan is not None else plan_precisions(sensitivity, budget)
    result.sensitivity = {"key": sensitivity.key, "measured_tensors": sensitivity.measured,
                          "proxy_rank_correlation": sensitivity.correlation,
                          "calibration": str(calibration.text) if calibration.given else "built-in calibration text",
                          "priced_for": sensitivity.priced_for}
    if sensitivity.priced_for == "gptq":
        result.sensitivity["gptq_gains"] = sensitivity.gptq_gains
    return result
