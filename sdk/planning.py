"""`edgeq.plan()`: sensitivity (cached) + a budget from the device, a size or bits per weight → Plan."""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from .errors import EdgeqError
from .importance import CALIBRATION_TEXT
from .planner import Plan, plan_precisions
from .sensitivity import Sensitivity, measure_sensitivity

log = logging.getLogger(__name__)
RUNTIME_OVERHEAD = 64 << 20  # compute buffers and the runtime itself, beside weights and KV cache
# Nominal bits per weight of each uniform precision: the size a device's preferred precision implies.
NOMINAL_BPW = {"Q4_0": 4.5, "IQ4_NL": 4.5, "Q4_K_M": 4.85, "Q5_K_M": 5.69, "Q6_K": 6.56, "Q8_0": 8.5, "F16": 16.0,
               "int4": 5.0, "int8": 8.0, "fp16": 16.0, "fp32": 32.0, "palettize4": 4.0, "palettize6": 6.0}


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]i?b?|b)?\s*", size.lower())
    if not m:
        raise EdgeqError(f"size {size!r} is not a size; write e.g. 95MB, 1.2GiB or 100000000")
    unit = (m[2] or "b").rstrip("b").rstrip("i")
    return int(float(m[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit])


def kv_cache_bytes(config: dict, context: int) -> int:
    n_kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * n_kv * head_dim * context * 2  # keys and values, fp16


def budget_bytes(sensitivity: Sensitivity, config: dict, fmt: str, *, profile=None, size=None, bits_per_weight=None) -> int:
    """The byte budget for the weights: explicit size or bits per weight, else what the device implies."""
    weights = sum(math.prod(t["shape"]) for t in sensitivity.tensors.values())
    if size is not None:
        return parse_size(size)
    if bits_per_weight is not None:
        return int(weights * float(bits_per_weight) / 8) + sensitivity.fixed_bytes
    if profile is None:
        raise EdgeqError("planning needs a budget: pass --device, --size or --bits-per-weight")
    memory = profile.budget_bytes - kv_cache_bytes(config, profile.context_length) - RUNTIME_OVERHEAD
    preferred = (profile.precisions.get(fmt) or ("Q4_K_M",))[0]
    target = int(weights * NOMINAL_BPW.get(preferred, 4.85) / 8) + sensitivity.fixed_bytes
    if memory < target:
        log.info("device memory budget %.0f MiB is below the %s size; planning for memory", memory / 2**20, preferred)
    return min(memory, target)


def plan(model: str | Path | None = None, *, device: str | Path | None = None, format: str = "gguf",
         size: str | int | None = None, bits_per_weight: float | None = None, adapter: str | Path | None = None,
         calibration: str | Path | None = None, progress: bool | None = None) -> Plan:
    """Chooses a precision per tensor for `model` on `device` (or within `size` / `bits_per_weight`).

    Sensitivity is measured once per model, calibration text and format, then cached, so planning
    the same model for another device takes seconds.
    """
    from edgeq.devices import load_device

    from .intake import open_model

    if model is None:
        from .default_model import default_model_path

        model = default_model_path(progress=progress)
    source = open_model(model, adapter=adapter)
    profile = load_device(device) if device else None
    return plan_for(source, format, profile=profile, size=size, bits_per_weight=bits_per_weight, calibration=calibration, progress=progress)[0]


def plan_for(source, fmt: str, *, profile=None, size=None, bits_per_weight=None, calibration=None, progress=None) -> tuple[Plan, dict]:
    """The plan and the importance matrix it was made with (which the converter then quantizes with)."""
    sensitivity = measure_sensitivity(source, fmt, Path(calibration) if calibration else CALIBRATION_TEXT, progress=progress)
    budget = budget_bytes(sensitivity, source.config, fmt, profile=profile, size=size, bits_per_weight=bits_per_weight)
    result = plan_precisions(sensitivity, budget)
    result.sensitivity = {"key": sensitivity.key, "measured_tensors": sensitivity.measured,
                          "proxy_rank_correlation": sensitivity.correlation,
                          "calibration": str(calibration) if calibration else "built-in calibration text"}
    return result, sensitivity.importance
