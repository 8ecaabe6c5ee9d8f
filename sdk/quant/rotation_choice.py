"""`rotate=auto`: rotate only when it measures better, on the calibration text, in the format's own rounding.

A rotation spreads outliers, which helps a plain grid; a rounding weighted by an importance matrix already spends
its precision where the activations are large, and a rotation also spreads those, so it can lose (issue 29: on a
real 1.5B, llama.cpp's Q4_K_M+imatrix rotated had 1.6× the KL of the model unrotated). So the choice is measured:
each model (unrotated, rotated) has every linear and the head quantized in place by the format's own round trip
(`PrecisionSpace.round_trip`, weighted by that model's own importance matrix on the same text), and the one whose
KL against the float model on the calibration windows is lower is exported. Both models compute the same float
function, so one set of reference log-probabilities judges both. The round trip is the format's nearest
(importance-weighted) rounding, not GPTQ: what is compared is how well each set of weights fits the grid.
"""
from __future__ import annotations

import numpy as np

from ..progress import bar
from .importance import compute_importance

AUTO_TOKENS = 2048  # calibration tokens judged: reference log-probs of 2048 × 152k vocabulary in float16 is 0.6 GB


def measurement_type(space, nominal_bpw: dict, precision: str, shape) -> str:
    """The type a tensor is judged at: the precision itself when the space has it, else the candidate whose size
    is nearest the precision's nominal bits per weight (GGUF Q4_K_M → Q4_K on 256-wide rows)."""
    candidates = space.candidates(shape)
    if precision in candidates:
        return precision
    bits = nominal_bpw.get(precision, 4.5)
    n = int(np.prod(shape))
    return min(candidates, key=lambda t: abs(space.nbytes(t, shape) * 8 / n - bits))


def _windows(calibration) -> list[list[int]]:
    chosen, total = [], 0
    for window in calibration.windows:
        if total >= AUTO_TOKENS:
            break
        chosen.append(window)
        total += len(window)
    return chosen


def _log_probs(model, window):
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([window]), use_cache=False).logits[0].float(), -1)


def _quantize_in_place(model, space, nominal_bpw, precision, importance, progress) -> None:
    """Every linear of the layers and the head, through the format's round trip (a tied head gets its own copy:
    an export quantizes the head whatever the embedding holds)."""
    import torch

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad(), bar(len(linears), "rotate=auto: quantizing", "tensor", progress) as pbar:
        for name, module in linears:
            weight = module.weight.detach().float().numpy()
            kind = measurement_type(space, nominal_bpw, precision, weight.shape)
            done = space.round_trip(weight, kind, importance.get(f"{name}.weight"))
            module.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(done, dtype=np.float32)).to(module.weight.dtype))
            pbar.update(1)


def _kl(model, windows, reference) -> float:
    total, count = 0.0, 0
    for window, ref in zip(windows, reference):
        got = _log_probs(model, window)
        ref = ref.float()
        total += float((ref.exp() * (ref - got)).sum())
        count += len(window)
    return total / count


def measure_rotation(source, rotated, spec, precision: str, calibration, progress: bool | None = None) -> dict:
    """KL of both models quantized at `precision` on the calibration text; "chosen" is the lower one's name."""
    import gc

    from ..float_model import load_float_model

    space = spec.space()
    windows = _windows(calibration)
    reference = None
    kl = {}
    for name, model_source in (("off", source), ("on", rotated)):
        model = load_float_model(model_source)
        if reference is None:
            reference = [_log_probs(model, w).half() for w in windows]
        importance = compute_importance(model, windows, progress)
        _quantize_in_place(model, space, spec.nominal_bpw, precision, importance, progress)
        kl[name] = _kl(model, windows, reference)
        del model
        gc.collect()
    return {"chosen": "on" if kl["on"] < kl["off"] else "off", "kl": kl, "precision": precision,
            "tokens": sum(len(w) for w in windows),
            "how": "every linear and the head rounded by the format's own importance-weighted round trip, KL against "
                   "the float model on the calibration text"}
