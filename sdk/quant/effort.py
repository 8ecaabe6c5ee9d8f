"""How hard an export works for quality: `--effort fast | standard | max`, the same three words for every format.

- fast: each block rounded alone to its nearest levels (weighted by the importance matrix when calibration text is
  given): seconds.
- standard, the default: each format's default rounding, error-correcting (GPTQ, `edgeq.quant.gptq`) where it
  measured better than fast: ONNX int4/int8 (on the built-in text when none is given), GGUF's own block types and
  Core ML int4 when calibration text is given (bench/README.md, issue 29; without the user's text their GPTQ pass
  over the float model would cost minutes at 1B+ for a built-in text's gain).
- max: GPTQ, then each layer's rounding refined by learned offsets against the float layer's outputs
  (`edgeq.quant.learned`, AutoRound's rounding offsets over each format's own block scales): minutes more per
  layer-hour of GPTQ, never worse than standard on the calibration text, layer by layer.

Each effort is a `rounding` option of the formats (`FormatSpec.roundings`); `--rounding` names one directly.
"""
from __future__ import annotations

from ..errors import EdgeqError

EFFORTS = ("fast", "standard", "max")
BY_GPTQ = ("gptq", "learned")  # the roundings that run GPTQ over the float model (learned scales start from it)
_ROUNDING = {"fast": "nearest", "standard": None, "max": "learned"}  # None: the format's own default, its error-correcting rounding where it wins
# Fewest calibration tokens GPTQ is given: below two windows of 512 the Hessian of even a 896-wide layer is rank-deficient
# and the damping, not the data, decides how errors move.
MIN_TOKENS = {"standard": 1024, "max": 2 * 1024}  # max: the windows it learns on, and as many again it must not lose on
ROUNDS_BY = {"standard": "GPTQ", "max": "GPTQ and learned offsets"}


def rounding_for(effort: str | None, rounding: str | None) -> str | None:
    """The `rounding` option an export runs with, from `effort` or `rounding` (one of them, or neither)."""
    if effort is None:
        return rounding
    if effort not in EFFORTS:
        raise EdgeqError(f"--effort {effort!r} is not one of {', '.join(EFFORTS)}")
    if rounding is not None:
        raise EdgeqError(f"--effort {effort} and --rounding {rounding} both choose the rounding; give one of them")
    return _ROUNDING[effort]


def require_tokens(calibration, effort: str = "standard") -> None:
    """Refuses, in one line with the minimum and what was given, calibration text too short for `effort`."""
    given, minimum = sum(map(len, calibration.windows)), MIN_TOKENS[effort]
    if given < minimum:
        text = calibration.text if calibration.given else "the built-in calibration text"
        raise EdgeqError(f"--effort {effort} rounds by {ROUNDS_BY[effort]} and needs at least {minimum} calibration tokens; {text} gave "
                         f"{given}: give more text (--calibration, --calibration-tokens) or use --effort fast")
