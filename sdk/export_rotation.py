"""`rotate=` of an export: the job's source swapped for its rotated copy (`edgeq.quant.rotation`) before anything
calibrates, plans or converts, so every later step (sensitivity, GPTQ, the converter, the quality check) reads the
rotated weights as it reads any checkpoint.

`auto` measures instead of assuming: a rotation spreads outliers, which helps a plain grid and GPTQ, but an
importance-weighted rounding already spends its precision where the activations are large, and a rotation spreads
those too (issue 29: on a real 1.5B, llama.cpp's Q4_K_M+imatrix rotated had 1.6× the KL of the model unrotated;
an importance-weighted round trip of SmolLM2 at Q4_K measured 2.1× rotated, where the GPTQ export measured 0.79×).
So both models are converted, by the converter itself with the export's own rounding, and scored against the float
model on the calibration text; the lower KL is exported. That costs two trial conversions beside the one that lands.
"""
from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

from .errors import EdgeqError
from .quant.calibration import Calibration
from .quant.rotation import HEAD_MIX_TENSOR, check_rotatable, rotated_source

log = logging.getLogger(__name__)
AUTO_TOKENS = 2048  # calibration tokens each trial conversion is scored on
# A rotated file may be this much larger and still count as the same size: ONNX's head mix (hidden × hidden at 16 bits,
# 0.7% of SmolLM2's int4 file, 0.4% of a 1.5B's) rides; an untied head (18% of SmolLM2's GGUF Q4_0) does not.
SAME_SIZE = 0.01


def choose_rotation(opts, spec, precision: str, kept_adapters: bool, source) -> tuple[str, str | None]:
    """The rotation an export runs (off, on, auto), and why the format's default one does not run. Asked for: checked
    before any work (a family or kept adapters it cannot preserve are refused). Not asked: on where the format rotates
    by default and the export rounds by GPTQ (ONNX: a rotation helps GPTQ, bench/README.md), unless the model cannot
    be rotated, which the manifest then says."""
    if opts.rotate is not None:
        if opts.rotate != "off":
            check_rotatable(source, kept_adapters)
        return opts.rotate, None
    if not (spec.rotates_by_default and spec.rounds_by_gptq(precision, opts.format_options["rounding"], opts.calibration is not None)):
        return "off", None
    try:
        check_rotatable(source, kept_adapters)
    except EdgeqError as exc:
        return "off", str(exc)
    return "on", None


def _windows(calibration) -> list[list[int]]:
    chosen, total = [], 0
    for window in calibration.windows:
        if total >= AUTO_TOKENS:
            break
        chosen.append(window)
        total += len(window)
    return chosen


def _trial(job, source, calibration, convert, windows) -> tuple[float, int]:
    """KL against the float model, on `windows`, of `source` converted as the export would convert it, and the
    written tensors' bytes (a planned export's trial is at the format's default precision: the plan is made after
    this choice, for the chosen weights)."""
    from .loading import open_engine
    from .quality import compare

    trial = copy.copy(job)
    trial.source, trial.calibration, trial.manifest, trial.rotation = source, calibration, {}, None
    if job.planned:
        trial.precision, trial.overrides = job.spec.default_precision, None
    with tempfile.TemporaryDirectory(prefix="edgeq-rotate-auto-") as tmp:
        convert(trial, Path(tmp))
        engine = open_engine(Path(tmp), trial.manifest, job.spec.eval_runtime)
        try:
            context = trial.manifest.get("context_length") or len(windows[0])  # a model trained shorter than a window
            kl = compare(job.reference.engine, engine, [w[:context] for w in windows], job.progress, text="calibration text").kl
            return kl, sum(t["bytes"] for t in trial.manifest.get("tensors", {}).values())
        finally:
            engine.close()


def _measure(job, rotated, rotated_calibration, convert) -> dict:
    windows = _windows(job.calibration)
    off, on = (_trial(job, job.source, job.calibration, convert, windows),
               _trial(job, rotated, rotated_calibration, convert, windows))
    choice = {"chosen": "on" if on[0] < off[0] else "off", "kl": {"off": off[0], "on": on[0]},
              "bytes": {"off": off[1], "on": on[1]}, "tokens": sum(len(w) for w in windows),
              "how": "both models converted with the export's own rounding, KL against the float model on the calibration text"}
    if choice["chosen"] == "on" and on[1] > off[1] * (1 + SAME_SIZE):
        # an untied head's bytes bought the win (GGUF and ONNX write a tied table once): not the same-size trade auto may make
        choice["chosen"] = "off"
        choice["declined"] = (f"the rotated file is {on[1] - off[1]:,} bytes larger (its head untied), over "
                              f"{SAME_SIZE:.0%} more; pass rotate='on' to accept that")
    return choice


def rotate_job(job, convert) -> None:
    """Swaps the job's source, float reference and calibration for the rotated model's when rotating (or when `auto`
    measured it better; `convert(job, stage)` is the export's conversion step, which `auto` runs on trial); records
    what was done, or measured, in `job.rotation`."""
    from .float_model import FloatReference

    asked = job.rotate
    if asked == "off":
        if job.opts.rotate is None and job.rotate_declined:
            job.rotation = {"asked": "default", "applied": False, "why": job.rotate_declined}
        return
    rotated, facts = rotated_source(job.source, progress=job.progress)
    reference = FloatReference(rotated)
    old = job.calibration
    calibration = Calibration(rotated, old.text if old.given else None, old.tokens, reference=reference)
    chosen = "on"
    if asked == "auto":
        choice = _measure(job, rotated, calibration, convert)
        reference.release()
        chosen = choice["chosen"]
        facts = {**facts, "auto": choice}
        log.info("rotate=auto: KL on the calibration text %.5f unrotated, %.5f rotated: %s", choice["kl"]["off"],
                 choice["kl"]["on"], "rotating" if chosen == "on" else "not rotating")
    job.rotation = {"asked": asked if job.opts.rotate else "default", "applied": chosen == "on", **facts}
    if chosen != "on":
        return
    job.reference.release()
    job.source, job.reference, job.calibration = rotated, reference, calibration


def rotation_manifest(job, fields: dict) -> dict | None:
    """What the manifest says: the rotation (or the measurement that declined it), and what the tie cost: an untied
    head's bytes, or the bytes of the mix that kept one table."""
    if job.rotation is None:
        return None
    record = dict(job.rotation)
    record.pop("tied", None)
    record.pop("head_mix", None)  # the rotated folder's file; the manifest says what the bundle holds
    if record["applied"] and record.get("tied_head", "").startswith("untied"):
        tensors = fields.get("tensors") or {}
        if mix := tensors.get(HEAD_MIX_TENSOR):
            record["tied_head"] = "one table: the head reads it after a hidden × hidden mix (the final norm's gain, rotated)"
            record["head_mix_bytes"] = mix["bytes"]
        else:
            head = tensors.get("lm_head.weight") or tensors.get("output.weight")  # GGUF's files name it llama.cpp's way
            record["untied_head_bytes"] = head["bytes"] if head else None
    return record
