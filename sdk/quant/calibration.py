"""Calibration data: the one route by which text reaches quantization, whatever the format.

An export makes one `Calibration`; the planner's sensitivity, llama.cpp's importance matrix and ONNX's
GPTQ all read the text, windows and importance matrix from it, and run the float model the export handed
it (`edgeq.float_model.FloatReference`), so nothing is loaded twice and the manifest can say which text
shaped the weights.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from ..validate import read_text_file

CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "calibration_text.txt"  # used when the caller gives none
WINDOW = 512


class Calibration:
    """Calibration text for `source`, with everything derived from it loaded on first use.

    `given` says whether the user chose the text; a built-in text is good enough for GPTQ and for a plan's
    sensitivity, but not worth loading the float model only to weigh nearest rounding.
    """

    def __init__(self, source, text: str | Path | None, tokens: int = 8192, reference=None):
        from ..float_model import FloatReference

        self.source, self.tokens = source, tokens
        self.reference = reference or FloatReference(source)  # the export's float model, handed in when it has one
        self.given = text is not None
        self.text = Path(text) if text is not None else CALIBRATION_TEXT
        if self.given:
            read_text_file(self.text, "calibration text")  # UTF-8, not binary, not empty: checked before any work
        self.used = False       # set when anything shaped weights with it (recorded in the manifest)
        self.gptq_gains: dict[str, float] | None = None  # a planned export sets {} for GPTQ to fill (`gptq.gain`)
        self._importance: dict[str, np.ndarray] | None = None

    @property
    def model(self):
        """The float model that the text runs through (the reference's)."""
        self.used = True
        return self.reference.model

    @cached_property
    def windows(self) -> list[list[int]]:
        self.used = True
        return calibration_windows(self.source.chat_tokenizer(), self.text, self.tokens, WINDOW)

    def release(self) -> None:
        """Drops the float model (a 3B one is gigabytes the rest of an export may need); it loads again on use."""
        self.reference.release()

    def adopt_importance(self, importance: dict[str, np.ndarray]) -> None:
        """An importance matrix already measured on this text (a plan's sensitivity): reused, not recomputed."""
        self._importance, self.used = importance, True

    def measured_importance(self) -> dict[str, np.ndarray] | None:
        """The importance matrix if one was measured already (a plan's), without measuring one."""
        if self._importance is not None:
            self.used = True
        return self._importance

    def importance(self, progress: bool | None = None) -> dict[str, np.ndarray] | None:
        """The importance matrix to weigh rounding by: one already measured, or the user's text's (computed
        now); None for the built-in text, which would cost a model load for little."""
        if self._importance is None and self.given:
            from .importance import compute_importance

            loaded_for_it = not self.reference.loaded
            self._importance = compute_importance(self.model, self.windows, progress)
            if loaded_for_it:  # the float model is let go before the converter writes: a later user loads it again
                self.release()
        if self._importance is not None:
            self.used = True
        return self._importance

    def activation_peaks(self, keep_loaded: bool) -> dict[str, float]:
        """The largest |activation| at every linear layer, on the first two windows (`importance.activation_peaks`);
        the float model stays loaded if `keep_loaded` (GPTQ comes next) or if it already was."""
        from .importance import activation_peaks

        loaded_for_it = not self.reference.loaded
        peaks = activation_peaks(self.model, self.windows[:2])
        if loaded_for_it and not keep_loaded:
            self.release()
        return peaks

    def describe(self) -> dict | None:
        if not self.used:
            return None
        from ..hashing import sha256_file

        return {"text": str(self.text) if self.given else "built-in calibration text", "sha256": sha256_file(Path(self.text)),
                "tokens": self.tokens}


def calibration_windows(tokenizer, data_path: Path, tokens: int, ctx: int) -> list[list[int]]:
    """Token windows of a data file: text cut into windows of `ctx` ids, or JSONL chats rendered with the
    model's chat template (one window per conversation), about `tokens` in all."""
    from ..eval_data import read_dataset

    return [sample.ids for sample in read_dataset(data_path, tokenizer, tokens=tokens, ctx=ctx).samples]
