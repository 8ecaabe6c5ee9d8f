"""Activation statistics from calibration text: the importance matrix llama.cpp's quantizer weighs errors by.

For every linear layer, the mean of the squared input activations per input column, over all
calibration tokens. Names are the HF weight names; each converter maps them to its own. The head's input
is the final norm's output, read there, and the head itself never runs: neither its logits (every position
times a vocabulary of up to 262k rows, the largest product of the pass) nor, for a 16-bit model computing in
float32, its weight's float32 copy (a tied 128k-row head's is gigabytes at 3B).
"""
from __future__ import annotations

import numpy as np

from ..progress import bar


def compute_importance(model, windows: list[list[int]], progress: bool | None = None) -> dict[str, np.ndarray]:
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def record(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        sums[name] = sums.get(name, 0) + (x * x).sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    def hook_for(name):
        return lambda module, inputs, output: record(name, inputs[0])

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
            hooks.append(module.register_forward_hook(hook_for(f"{name}.weight")))
    hooks.append(model.model.norm.register_forward_hook(lambda module, inputs, output: record("lm_head.weight", output)))
    try:
        with torch.inference_mode(), bar(len(windows), "importance", "window", progress) as pbar:
            for window in windows:
                model.model(input_ids=torch.tensor([window]), use_cache=False)
                pbar.update(1)
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}


def activation_peaks(model, windows: list[list[int]]) -> dict[str, float]:
    """The largest |activation| into and out of every linear layer on `windows` (HF weight names). A kernel that
    computes in float16 (ONNX's MatMulNBits with float16 scales) overflows past 65504, and some models carry
    "massive activations" of 10^4 (SmolLM2-135M: 24176 out of one down_proj). They sit on the first positions of any
    text, so a couple of windows find them. The head's input is the final norm's output; its logits are not computed."""
    import torch

    peaks: dict[str, float] = {}

    def record(name, *tensors):
        peaks[name] = max(peaks.get(name, 0.0), *(float(t.detach().abs().max()) for t in tensors))

    hooks = [module.register_forward_hook(lambda m, inputs, output, name=f"{name}.weight": record(name, inputs[0], output))
             for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and module is not model.lm_head]
    hooks.append(model.model.norm.register_forward_hook(lambda m, inputs, output: record("lm_head.weight", output)))
    try:
        with torch.inference_mode():
            for window in windows:
                model.model(input_ids=torch.tensor([window]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return peaks
