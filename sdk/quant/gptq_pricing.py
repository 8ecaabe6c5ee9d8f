"""What GPTQ leaves of nearest rounding's error, per kind of tensor and precision, measured before a plan is made.

Sensitivity prices every option at the format's nearest (importance-weighted) round trip. An export that rounds by
GPTQ lowers that error by a share that differs by precision and kind of tensor, so a plan priced at nearest rounding
buys bits GPTQ makes unnecessary (an ExecuTorch plan that raised linears to 8da8w lost to the uniform GPTQ 8da4w so). A few decoder layers spread over depth (and a head of its own) get their inputs' full Hessian
of the calibration text; GPTQ rounds a sample of their rows at every precision the format has a grid for, on the
tokens an export rounds on (its default `calibration_tokens`), and the ratio of output errors GPTQ / nearest
(`gptq.gain`) is judged on the text that follows: GPTQ fits its own tokens far better than other text, by a margin
that shrinks with the tokens it had (bench/README.md, "Plans priced for GPTQ"), and a plan is judged on text it did
not see.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np

from ..checkpoint import layer_index
from ..progress import bar

SAMPLE_ROWS = 128  # rows of a tensor GPTQ rounds per precision: rows are independent given the Hessian
LAYERS = 3  # decoder layers measured, spread over depth
FIT_TOKENS, JUDGE_TOKENS = 8192, 2048  # GPTQ's tokens (an export's default `calibration_tokens`), then the text judged on


def measure_gains(model, targets: dict[str, list[str]], space, windows: list[list[int]], importance: dict,
                  progress: bool | None = None) -> dict[str, dict[str, float]]:
    """HF name → precision → GPTQ's output error over nearest rounding's, for `targets` (HF name → the precisions to
    price), rounded on the first `FIT_TOKENS` of `windows` and judged on the rest; precisions the format keeps at
    nearest rounding get none. (A text of one window is judged on itself.)"""
    import torch

    from .gptq import inverse_hessian_factor, damping, gain, gptq

    fit, judge = split_windows(windows)
    grams = _hessians(model, list(targets), fit, judge)
    rng = np.random.default_rng(0)
    gains: dict[str, dict[str, float]] = {}
    with bar(len(targets), "sensitivity: GPTQ's gain", "tensor", progress) as pbar:
        for name, precisions in targets.items():
            weight = model.get_parameter(name).detach().float()
            rows = torch.from_numpy(np.sort(rng.choice(weight.shape[0], size=min(SAMPLE_ROWS, weight.shape[0]), replace=False)))
            sample = weight[rows].contiguous()
            hessian, judged = grams[name]
            factor = inverse_hessian_factor(hessian, damping(sum(map(len, fit)), hessian.shape[0]))
            for precision in precisions:
                grid = space.gptq_grid(precision, sample, importance.get(name))
                if grid is not None and sample.shape[1] % grid.block == 0:
                    rounded, _ = gptq(sample, hessian, grid, factor)
                    gains.setdefault(name, {})[precision] = gain(sample, rounded, hessian, grid, judged)
            pbar.update(1)
    return gains


def split_windows(windows: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """(windows GPTQ rounds on, windows it is judged on): the judged share is JUDGE_TOKENS of FIT_TOKENS +
    JUDGE_TOKENS, by tokens (chats are windows of their own lengths), at least one window each where there are two."""
    if len(windows) < 2:
        return windows, windows
    total, seen = sum(map(len, windows)), 0
    for cut, window in enumerate(windows):
        if seen >= total * FIT_TOKENS / (FIT_TOKENS + JUDGE_TOKENS):
            break
        seen += len(window)
    cut = min(max(cut, 1), len(windows) - 1)
    return windows[:cut], windows[cut:]


def by_kind(gains: dict[str, dict[str, float]], kinds: dict[str, str]) -> dict[str, dict[str, float]]:
    """Kind → precision → the median gain of the measured tensors of that kind (`kinds`: HF name → kind)."""
    found: dict[str, dict[str, list[float]]] = {}
    for name, by_precision in gains.items():
        for precision, value in by_precision.items():
            found.setdefault(kinds[name], {}).setdefault(precision, []).append(value)
    return {kind: {p: round(float(np.median(v)), 4) for p, v in values.items()} for kind, values in found.items()}


class _DeepEnough(Exception):
    """Raised once the deepest layer whose inputs are priced has run: the layers after it would run for nothing."""


def _hessians(model, names: list[str], fit: list[list[int]], judge: list[list[int]]) -> dict:
    """HF name → (Hessian of its input on `fit`, on `judge`), each the upper triangle of XᵀX / tokens. The head's
    input is the final norm's output, read there: the head itself never runs (as `compute_importance`). Without a
    head to price, the forward stops after the deepest layer priced (at 1.5B, layer 14 of 28: half the cost)."""
    import torch

    from .gptq import upper_gram

    sums: dict[str, list] = {name: [0, 0] for name in names}
    counts = [0, 0]
    part = [0]

    def record(name, x):
        sums[name][part[0]] = sums[name][part[0]] + upper_gram(x.reshape(-1, x.shape[-1]))

    def stop(*_):
        raise _DeepEnough

    hooks = []
    for name in names:
        if name == "lm_head.weight":
            hooks.append(model.model.norm.register_forward_hook(lambda m, inputs, output, name=name: record(name, output)))
        else:
            module = model.get_submodule(name.removesuffix(".weight"))
            hooks.append(module.register_forward_pre_hook(lambda m, inputs, name=name: record(name, inputs[0])))
    layers = [layer_index(name) for name in names]
    if min(layers) >= 0:
        hooks.append(model.model.layers[max(layers)].register_forward_hook(stop))
    try:
        with torch.inference_mode():
            for part[0], windows in enumerate((fit, judge)):
                for window in windows:
                    try:
                        model.model(input_ids=torch.tensor([window]), use_cache=False)
                    except _DeepEnough:
                        pass
                    counts[part[0]] += len(window)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (fitted / counts[0], judged / counts[1]) for name, (fitted, judged) in sums.items()}


def priced_for_gptq(sensitivity):
    """The sensitivity with each option's ΔKL scaled by GPTQ's measured gain for its kind and precision (1 where none
    was measured: the embedding, a tied head, float types); the nearest-rounding ΔKL stays beside as `nearest_dkl`."""
    gains = sensitivity.gptq_gains
    if not gains:
        return sensitivity
    tensors = copy.deepcopy(sensitivity.tensors)
    for info in tensors.values():
        by_precision = gains.get(info["kind"], {})
        for precision, option in info["options"].items():
            factor = by_precision.get(precision, 1.0)
            option["nearest_dkl"], option["dkl"] = option["dkl"], option["dkl"] * factor
    return replace(sensitivity, tensors=tensors, priced_for="gptq")
