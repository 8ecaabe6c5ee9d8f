"""An export's staged bundle measured before it lands, and what a miss of a quality target does.

The bundle's engine is scored against the export's float reference on a built-in sample and on the user's
eval data; a far-off perplexity is flagged, kept adapters are measured one by one (`edgeq.adapter_quality`),
and a planned export's prediction is set beside the measurement (`plan_check`). A missed target re-plans with
the gap between simulation and measurement as a margin, or fails the export naming the smallest passing size.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import EdgeqError
from .loading import open_engine
from .quality import DEFAULT_TEXT, compare, finetune_quality
from .export_planning import corrected_plan, passing_size_hint
from .quant.calibration import calibration_windows

log = logging.getLogger(__name__)
PPL_GUARD = 1.5  # a perplexity this many times the original's is far past what any shipped precision gives
PLAN_BAR = 1.3   # a plan's measured KL beyond this factor of its prediction, on the same tokens, is reported


def measure(job, stage: Path) -> None:
    """Quality of the staged bundle against the float reference before it lands: on a built-in sample, and on the
    user's eval data (fine-tune metrics) when given; kept adapters each against their own float merged model."""
    opts = job.opts
    if not opts.eval_tokens and job.data is None and not job.targets and not job.adapter_data:
        return
    reference = job.reference.engine  # loaded already if calibration used it
    # a format may name the engine that can measure it here (Core ML on Linux: coreml-torch)
    candidate = open_engine(stage, job.manifest, job.spec.eval_runtime)
    try:
        if opts.eval_tokens:
            windows = calibration_windows(job.source.chat_tokenizer(), DEFAULT_TEXT, opts.eval_tokens, opts.eval_ctx)
            job.manifest["quality"] = compare(reference, candidate, windows, job.progress, text="built-in sample").to_dict()
            _guard(job.manifest)
        if job.data is not None:
            job.manifest["finetune_quality"] = finetune_quality(reference, candidate, job.data, tokenizer=job.source.chat_tokenizer(),
                                                                base=job.base, progress=job.progress).to_dict()
        if job.adapters and (opts.eval_tokens or job.adapter_data):
            records = _measure_adapters(job, candidate)
            for entry in job.manifest["adapters"]:
                entry.update(records[entry["name"]])
        if job.plan and job.sensitivity is not None and "quality" in job.manifest:
            job.manifest["plan_check"] = _plan_check(job, reference, candidate)
    finally:
        candidate.close()


def _measure_adapters(job, candidate) -> dict[str, dict]:
    from .adapter_quality import measure_kept
    from .eval_data import read_dataset

    opts, tokenizer = job.opts, job.source.chat_tokenizer()
    windows = calibration_windows(tokenizer, DEFAULT_TEXT, opts.eval_tokens or 1024, opts.eval_ctx)
    data = {name: read_dataset(path, tokenizer, tokens=opts.eval_data_tokens, ctx=opts.eval_ctx * 4)
            for name, path in job.adapter_data.items()}
    return measure_kept(candidate, job.adapters, tokenizer, reference_for=lambda adapter: _float_engine(job, adapter),
                        merged_for=(lambda adapter, folder: _merged_engine(job, adapter, folder)) if opts.compare_merged else None,
                        data_for=data, base_engine=job.reference.engine if data else None, windows=windows, progress=job.progress)


def _float_engine(job, adapter):
    """The float model with `adapter` merged: the fine-tune as trained, what a kept adapter is measured against."""
    from . import registry
    from .intake import open_model

    source = open_model(job.source.path, adapter=adapter.path, trust_pickle=job.source.trust_pickle)
    return registry.runtimes.get(registry.REFERENCE_RUNTIME)(source)


def _merged_engine(job, adapter, folder: Path):
    """The adapter merged into the float base and converted like the bundle's base (same precision or plan)."""
    from .float_model import FloatReference
    from .intake import open_model
    from .quant.calibration import Calibration

    merged = open_model(job.source.path, adapter=adapter.path, trust_pickle=job.source.trust_pickle)
    if job.source.untied_head:
        merged.untie_head()  # the bundle's plan (or overrides) names the head as a tensor of its own
    reference = FloatReference(merged)
    calibration = Calibration(merged, job.calibration.text if job.calibration.given else None, job.calibration.tokens, reference)
    try:
        fields = job.spec.converter().convert(merged, folder, precision=job.precision, overrides=job.overrides,
                                              calibration=calibration, progress=job.progress, **job.options)
    finally:
        reference.release()
    return open_engine(folder, {**job.manifest, **fields, "adapters": []}, job.spec.eval_runtime)


def _guard(manifest: dict) -> None:
    quality = manifest["quality"]
    if quality["ppl"] > PPL_GUARD * quality["ppl_ref"]:
        manifest["quality_warning"] = (f"perplexity {quality['ppl']:.2f} is over {PPL_GUARD}x the original's "
                                       f"{quality['ppl_ref']:.2f} (KL {quality['kl']:.3f}): this export lost much of the model")
        log.warning("%s; try a larger precision or --calibration with text like the model's input", manifest["quality_warning"])


def check_targets(job, retry: bool) -> bool:
    """True when the measured quality meets the targets (or a miss is allowed). On a miss of a plan made for
    the targets, with `retry`, the plan is made again with the gap between simulation and measurement as a
    margin and False says to convert it; otherwise a miss fails the export, naming the smallest passing size."""
    measured = job.manifest.get("finetune_quality") or job.manifest.get("quality") or {}
    if not measured:
        raise EdgeqError("--max-kl needs a measurement; drop --eval-tokens 0 or pass --eval-data")
    misses = job.targets.misses(measured)
    job.manifest["targets"] = {**job.targets.to_dict(), "met": not misses}
    if not misses:
        return True
    searched = job.sensitivity is not None and job.opts.size is None and job.opts.bits_per_weight is None
    if searched and retry:
        try:
            job.plan = corrected_plan(job, measured)
            job.overrides = job.plan.overrides()
            log.info("measured %s; converting the next plan predicted to pass", "; ".join(misses))
            return False
        except EdgeqError:
            pass
    hint = passing_size_hint(job, measured)
    if job.opts.allow_quality_miss:
        job.manifest["targets"]["misses"] = misses
        log.warning("the export misses its target (%s)%s; kept because of --allow-quality-miss", "; ".join(misses), hint)
        return True
    raise EdgeqError(f"the export misses its target: {'; '.join(misses)}{hint}; nothing was written "
                     "(--allow-quality-miss keeps it anyway)")


def _plan_check(job, reference, candidate) -> dict:
    """The planner's prediction beside the bundle's KL on the very tokens it was predicted on (the calibration
    sequence sensitivity measured); a gap of more than 1.3x either way is reported. The prediction is the plan
    simulated: every tensor rounded at once by the format's round trip on the float model (`sensitivity.simulate`),
    which sees what summing per-tensor ΔKL misses, scaled by what the plan's own pricing leaves of nearest rounding's
    summed ΔKL (GPTQ's gains judged on text it did not fit, `gptq_pricing`; 1 for a plan priced at nearest). GPTQ's
    gains on its own tokens, measured as the export rounded each tensor (`edgeq.quant.gptq.gain`), are reported beside:
    scaled by those, predictions fell short of the measured KL even on these tokens (bench/README.md)."""
    from .quant.sensitivity import measured_sequence, simulate

    plan, gains, calibration = job.plan, job.calibration.gptq_gains or {}, job.calibration
    sequence = measured_sequence(calibration.windows)
    nearest = {e.tensor: job.sensitivity.tensors.get(e.tensor, {}).get("options", {}).get(e.precision, {}).get("nearest_dkl", e.dkl)
               for e in plan.entries}
    at_nearest = sum(nearest.values())
    priced = plan.predicted_kl / at_nearest if at_nearest else 1.0
    simulated = simulate(calibration.model, plan.overrides(), job.spec.space(), calibration.importance() or {}, sequence)
    predicted = simulated * priced
    measured = compare(reference, candidate, [sequence], text="calibration text").kl
    ratio = measured / predicted if predicted else float("inf")
    check = {"predicted_kl": round(predicted, 6), "measured_kl": round(measured, 6), "ratio": round(ratio, 3),
             "summed_kl": round(plan.predicted_kl, 6), "nearest_kl": round(at_nearest, 6), "simulated_kl": round(simulated, 6),
             "predicted_on": f"{plan.sensitivity.get('calibration', 'calibration text')}, {len(sequence)} tokens (the plan simulated)",
             "measured_on": f"same {len(sequence)} tokens", "sample_kl": job.manifest["quality"]["kl"]}
    if gains:
        own = sum(dkl * gains.get(tensor, 1.0) for tensor, dkl in nearest.items()) / at_nearest if at_nearest else 1.0
        check["gptq_on_its_own_tokens"] = (f"{len(gains)} tensors rounded by GPTQ left {own:.2f} of the summed nearest dKL at "
                                           f"their output-error ratio on the calibration text (median {float(np.median(list(gains.values()))):.2f}); "
                                           f"the plan priced {priced:.2f}")
    if not 1 / PLAN_BAR <= ratio <= PLAN_BAR:
        check["note"] = (f"measured KL differs from the prediction by more than {PLAN_BAR}x on the same tokens: the "
                         "converter's rounding is not the planner's round trip for this model")
        log.warning("plan check: %s (predicted %.4f, measured %.4f)", check["note"], predicted, measured)
    return check
