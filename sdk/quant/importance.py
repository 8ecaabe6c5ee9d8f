"""Activation statistics from calibration text: the importance matrix llama.cpp's quantizer weighs errors by.

For every linear layer, the mean of the squared input activations per input column, over all
calibration tokens. Names are the HF weight names; each converter maps them to its own.
"""
from __future__ import annotations

import numpy as np

from ..progress import bar


def compute_importance(model, windows: list[list[int]], progress: bool | None = None) -> dict[str, np.ndarray]:
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_hook(hook_for(f"{name}.weight")))
    try:
        with torch.inference_mode(), bar(len(windows), "importance", "window", progress) as pbar:
            for window in windows:
                model(input_ids=torch.tensor([window]), use_cache=False)
                pbar.update(1)
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}
