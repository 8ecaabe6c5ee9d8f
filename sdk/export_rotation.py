"""`rotate=` of an export: the job's source swapped for its rotated copy (`edgeq.quant.rotation`) before anything
calibrates, plans or converts, so every later step (sensitivity, GPTQ, the converter, the quality check) reads the
rotated weights as it reads any checkpoint. `auto` asks `edgeq.quant.rotation_choice` which of the two rounds better.
"""
from __future__ import annotations

import logging

from .quant.calibration import Calibration
from .quant.rotation import check_rotatable, rotated_source

log = logging.getLogger(__name__)


def check_rotation(opts, kept_adapters: bool, source) -> None:
    """Refusals before any work: a family or kept adapters that a rotation cannot preserve."""
    if opts.rotate != "off":
        check_rotatable(source, kept_adapters)


def rotate_job(job) -> None:
    """Swaps the job's source, float reference and calibration for the rotated model's when rotating (or when
    `auto` measured it better); records what was done, or measured, in `job.rotation`."""
    from .float_model import FloatReference

    asked = job.opts.rotate
    if asked == "off":
        return
    rotated, facts = rotated_source(job.source, progress=job.progress)
    chosen = "on"
    if asked == "auto":
        from .quant.rotation_choice import measure_rotation

        choice = measure_rotation(job.source, rotated, job.spec, job.precision if not job.planned else job.spec.default_precision,
                                  job.calibration, job.progress)
        chosen = choice["chosen"]
        if chosen == "on" and facts["tied_head"].startswith("untied"):
            # the win was measured in a larger file (the head's bytes again): not the same-size trade auto may make
            chosen = choice["chosen"] = "off"
            choice["declined"] = "rotating unties the head, which adds its bytes to the file; pass rotate='on' to accept that"
        facts = {**facts, "auto": choice}
        log.info("rotate=auto: KL on the calibration text %.5f unrotated, %.5f rotated: %s", choice["kl"]["off"],
                 choice["kl"]["on"], "rotating" if chosen == "on" else "not rotating")
    job.rotation = {"asked": asked, "applied": chosen == "on", **facts}
    if chosen != "on":
        return
    job.reference.release()
    job.source = rotated
    job.reference = FloatReference(rotated)
    old = job.calibration
    job.calibration = Calibration(rotated, old.text if old.given else None, old.tokens, reference=job.reference)


def rotation_manifest(job, fields: dict) -> dict | None:
    """What the manifest says: the rotation (or the measurement that declined it), and an untied head's bytes."""
    if job.rotation is None:
        return None
    record = dict(job.rotation)
    record.pop("tied", None)
    if record["applied"] and record.get("tied_head", "").startswith("untied"):
        tensors = fields.get("tensors") or {}
        head = tensors.get("lm_head.weight") or tensors.get("output.weight")  # GGUF's files name it llama.cpp's way
        record["untied_head_bytes"] = head["bytes"] if head else None
    return record
