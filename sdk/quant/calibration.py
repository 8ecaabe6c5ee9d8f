"""Activation statistics from calibration text: the importance matrix llama.cpp's quantizer weighs errors by.

For every linear layer, the mean of the squared input activations per input column, over all
calibration tokens. Names are the HF weight names; each converter maps them to its own.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import EdgeqError
from .progress import bar


CALIBRATION_TEXT = Path(__file__).with_name("calibration_text.txt")  # used when the caller gives none


class Calibration:
    """Calibration text for a converter that runs the float model on it itself (ONNX: GPTQ rounding).

    Nothing loads until the converter asks: the float reference model on first `model`, the token
    windows on first `windows`; export() then reuses the loaded reference for its quality check.
    """

    def __init__(self, source, text: Path | None, tokens: int):
        self.source, self.tokens = source, tokens
        self.text = Path(text) if text else CALIBRATION_TEXT
        self.builtin = text is None
        if not self.text.is_file():
            raise EdgeqError(f"calibration text {self.text} does not exist; pass a UTF-8 text file")
        self.engine = None

    @property
    def model(self):
        if self.engine is None:
            from edgeq.runtimes.torch import TorchEngine

            self.engine = TorchEngine(self.source)
        return self.engine.model

    @cached_property
    def windows(self) -> list[list[int]]:
        return calibration_windows(self.source.chat_tokenizer(), self.text, self.tokens, 512)

    def describe(self) -> dict:
        return {"text": "built-in calibration text" if self.builtin else str(self.text), "tokens": self.tokens}


def calibration_windows(tokenizer, text_path: Path, tokens: int, ctx: int) -> list[list[int]]:
    """Non-overlapping windows of `ctx` ids from the start of a text file (BOS first when the model wants it)."""
    path = Path(text_path)
    if not path.is_file():
        raise EdgeqError(f"text file {path} does not exist; pass a UTF-8 text file")
    ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
    bos = tokenizer.token_id(tokenizer.spec.bos_token) if tokenizer.spec.add_bos_token else None
    width = ctx - (bos is not None)
    windows = [ids[i:i + width] for i in range(0, min(len(ids), tokens), width)]
    windows = [w for w in windows if len(w) == width] or windows[:1]
    if not windows or len(windows[0]) < 2:
        raise EdgeqError(f"{path} holds too little text to measure anything; use a longer file")
    return [([bos] if bos is not None else []) + w for w in windows]


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
