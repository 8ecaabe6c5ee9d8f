"""A planned export's plan: made from measured sensitivity within a budget (or the smallest predicted to meet
quality targets), made again when the bundle comes out over `--size` on disk, or corrected by how far a
measured export fell from its simulation. The planner itself is `edgeq.planning` and `edgeq.quant`; this is
what an export job asks of it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .bundle import CARD_BYTES, TOKENIZER_FILES
from .errors import EdgeqError

log = logging.getLogger(__name__)


def calibrate(job) -> None:
    """A planned export measures sensitivity on the calibration text and plans within the budget (or, with
    quality targets and no size, finds the smallest plan predicted to meet them); the importance matrix
    measured on the way stays with the job's calibration for the converter."""
    if not job.planned:
        return
    from .planning import budget_for, plan_from, sensitivity_for

    job.sensitivity = sensitivity_for(job.source, job.spec.name, job.calibration, job.progress, job.options.get("rounding"))
    job.calibration.gptq_gains = {}  # GPTQ, where it rounds, reports what it left on its own tokens (the plan check)
    if job.targets and job.opts.size is None and job.opts.bits_per_weight is None:
        from .quant.targets import smallest_passing_plan

        cap = budget_for(job.sensitivity, job.source, job.spec.name, profile=job.profile) if job.profile else None
        job.plan, predicted = smallest_passing_plan(job.sensitivity, job.targets, simulator(job).measure, cap=cap, progress=job.progress)
        job.simulator.close()
        plan_from(job.plan, job.sensitivity, job.calibration)
        job.plan.sensitivity["predicted"] = predicted
    else:
        weights = None
        if job.opts.size is not None:
            beside = overhead_bytes(job)
            weights = job.opts.size - beside
            if weights <= 0:
                raise EdgeqError(f"--size {job.opts.size} bytes leaves nothing for the weights: the tokenizer, metadata and manifest "
                                 f"alone take about {beside} bytes; allow a larger size")
        if job.profile is not None and weights is None and job.opts.bits_per_weight is None:
            from .quant.kv_plan import plan_with_cache  # on a device, the KV cache type is chosen with the weights

            job.plan = plan_from(plan_with_cache(job.sensitivity, job.source, job.spec.name, job.calibration, job.profile,
                                                 job.opts.kv_cache), job.sensitivity, job.calibration)
        else:
            budget = budget_for(job.sensitivity, job.source, job.spec.name, profile=job.profile, size=weights,
                                bits_per_weight=job.opts.bits_per_weight)
            job.plan = plan_from(None, job.sensitivity, job.calibration, budget=budget)
    job.overrides = job.plan.overrides()


def simulator(job):
    """The plan simulator over the job's float model and eval data (or, without data, the built-in sample)."""
    if job.simulator is None:
        from .eval_data import read_dataset
        from .quality import DEFAULT_TEXT
        from .generate import LanguageModel
        from .quant.targets import PlanSimulator

        data = job.data or read_dataset(DEFAULT_TEXT, job.source.chat_tokenizer(), tokens=job.opts.eval_tokens or 1024, ctx=job.opts.eval_ctx)
        replies = LanguageModel(job.reference.engine, job.source.chat_tokenizer()) if job.targets.min_agreement is not None else None
        job.simulator = PlanSimulator(job.calibration.model, job.spec.space(), job.calibration.importance() or {}, data,
                                      job.base, replies)
    return job.simulator


def overhead_bytes(job) -> int:
    """Bytes on disk beside the weights: the copied tokenizer files, the format's own metadata (estimated by the
    format from the tokenizer's size) and the manifest. A planned bundle that still comes out larger is re-planned."""
    copied = sum((job.source.tokenizer_folder / n).stat().st_size for n in TOKENIZER_FILES if (job.source.tokenizer_folder / n).is_file())
    template = len((job.source.chat_template() or "").encode())
    tensors = len(job.source.shapes())
    return copied + template + job.spec.file_overhead(job.source, tensors, job.context) + 400 * tensors + (8 << 10)


def manifest_bytes(manifest: dict) -> int:
    """Bytes `edgeq.json` will take as written, plus 4 KiB for what is added as the bundle lands (its checksum table, the
    measured quality): a manifest that reads back every tensor (ExecuTorch's, 70+ KB on a 135M model) is no rounding error."""
    return len(json.dumps(manifest, indent=2).encode()) + 4096


def fits_size(job, stage: Path) -> bool:
    """A planned export with --size: is the staged bundle within it on disk? If not, the budget shrinks by the excess."""
    if job.opts.size is None or not job.planned:
        return True
    on_disk = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file()) + manifest_bytes(job.manifest) + CARD_BYTES
    if on_disk <= job.opts.size:
        return True
    log.info("planned bundle is %d bytes on disk, over --size %d: planning again with %d bytes less", on_disk, job.opts.size, on_disk - job.opts.size)
    from .planning import plan_from

    job.plan = plan_from(None, job.sensitivity, job.calibration, budget=job.plan.budget_bytes - (on_disk - job.opts.size) - 4096)
    job.overrides = job.plan.overrides()
    return False


def corrected_plan(job, measured: dict):
    """The smallest plan predicted to pass once the simulation is corrected by how far this export's
    measurement fell from its prediction."""
    from .planning import plan_from
    from .quant.targets import smallest_passing_plan

    sim = simulator(job)
    try:
        predicted = sim.measure(job.plan)
        margin = {"kl": max(measured["kl"] - predicted["kl"], 0.0)}
        if measured.get("flip_retention") is not None and predicted.get("flip_retention") is not None:
            margin["flip_retention"] = max(predicted["flip_retention"] - measured["flip_retention"], 0.0)
        if (measured.get("agreement") or {}).get("exact_match") is not None and predicted.get("agreement"):
            margin["exact_match"] = max(predicted["agreement"]["exact_match"] - measured["agreement"]["exact_match"], 0.0)
        plan, metrics = smallest_passing_plan(job.sensitivity, job.targets, sim.measure, margin=margin, progress=job.progress)
    finally:
        sim.close()
    plan = plan_from(plan, job.sensitivity, job.calibration)
    plan.sensitivity["predicted"] = metrics
    return plan


def passing_size_hint(job, measured: dict) -> str:
    if job.sensitivity is None:
        return "; try a larger --precision"
    try:
        plan = corrected_plan(job, measured)
    except EdgeqError as exc:
        return f"; {exc}"
    return f"; the smallest size predicted to pass is {(plan.total_bytes + overhead_bytes(job)) / 2**20:.2f} MiB (--size)"


