"""`edgeq.export()`: resolve → calibrate → convert → measure → land.

Each step is one function over an `ExportJob`, so the order of work (and what each step may load) reads
top to bottom in `export()`. The float reference is as large as the model in fp32: it loads only when
a step needs it (a plan, GPTQ, an importance matrix, the quality check) and is loaded once, through the
job's `Calibration`; the conversion itself streams tensor by tensor. With eval data, the export is judged
on it (the fine-tune's own conversations) and, with quality targets, fails rather than land a miss.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import registry
from .bundle import check_writable, staged_bundle, write_manifest
from .errors import EdgeqError
from .formats import FormatSpec
from .loading import CHAT_TEMPLATE_FILE, open_engine
from .quality import DEFAULT_TEXT, BaseScores, compare, finetune_quality
from .quant.calibration import Calibration, calibration_windows
from .quant.targets import Targets

log = logging.getLogger(__name__)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DEFAULT_CONTEXT = 4096
PPL_GUARD = 1.5  # a perplexity this many times the original's is far past what any shipped precision gives
EVAL_DATA_CTX = 1024
RETRIES = 2  # re-plans when a planned bundle comes out larger on disk than --size, or misses the target it was planned for


@dataclass
class ExportJob:
    """What was asked, resolved: the source, the format's spec, the precision, the options, where it lands."""

    source: object
    spec: FormatSpec
    precision: str
    planned: bool
    profile: object | None
    output: Path
    overwrite: bool
    options: dict
    overrides: dict[str, str] | None
    calibration: Calibration
    eval_tokens: int
    eval_ctx: int
    progress: bool | None
    size: int | None = None
    bits_per_weight: float | None = None
    targets: Targets = field(default_factory=Targets)
    allow_quality_miss: bool = False
    inputs: tuple = ()                  # what the export reads: the output may not be or hold any of them
    data: object | None = None          # edgeq.eval_data.Dataset of --eval-data
    base_source: object | None = None   # the model before fine-tuning
    base: BaseScores | None = None
    plan: object | None = None
    sensitivity: object | None = None
    simulator: object | None = None
    manifest: dict = field(default_factory=dict)
    workdir: Path | None = None
    adapters: list = field(default_factory=list)        # edgeq.adapter_set.KeptAdapter: LoRAs kept apart from the base
    adapter_data: dict = field(default_factory=dict)    # adapter name → its eval data
    compare_merged: bool = False                        # also measure each adapter merged then quantized
    eval_data_tokens: int = 2048


def choose_format(fmt: str | None, profile) -> FormatSpec:
    if fmt:
        return registry.formats.get(fmt)  # fails with the list of known formats
    if profile is None:
        return registry.formats.get(registry.DEFAULT_FORMAT)
    available = set(registry.formats.names())
    for candidate in profile.formats:
        if candidate in available:
            return registry.formats.get(candidate)
    raise EdgeqError(f"device {profile.id} runs {', '.join(profile.formats)}, none of which this edgeq can export; pass --format")


def choose_precision(precision: str | None, profile, spec: FormatSpec) -> str:
    if precision:
        return spec.normalize(precision)
    if profile is not None:
        for candidate in profile.precisions.get(spec.name, []):
            if candidate.lower() in {p.lower() for p in spec.precisions}:
                return spec.normalize(candidate)
    return spec.default_precision


def format_options(spec: FormatSpec, **asked) -> dict:
    """The format options that were set; a format without such an option refuses it before any work."""
    given = {name: value for name, value in asked.items() if value not in (None, False)}
    for name in given:
        if name not in spec.options:
            takers = [n for n in registry.formats.names() if name in registry.formats.get(n).options]
            raise EdgeqError(f"--{name.replace('_', '-')} does not apply to the {spec.name} format; drop it"
                             + (f" or choose --format {' or '.join(takers)}" if takers else ""))
    return given


def open_base(source, base, trust_pickle: bool = False):
    """The model before fine-tuning: `base` given, else the model under the adapter; refused when it is not
    the same architecture and vocabulary (retention compares token by token)."""
    from .intake import open_model

    if base is None and source.adapter is None:
        return None
    base_source = open_model(base if base is not None else source.path, trust_pickle=trust_pickle)
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if base_source.config.get(key) != source.config.get(key) and not (key == "vocab_size" and source.adapter):
            raise EdgeqError(f"--base {base_source.path} has {key} {base_source.config.get(key)!r} but the model has "
                             f"{source.config.get(key)!r}; pass the model this one was fine-tuned from")
    if base_source.vocab_size != source.vocab_size:
        raise EdgeqError(f"--base {base_source.path} has a vocabulary of {base_source.vocab_size} tokens, the model {source.vocab_size}; "
                         "retention compares token by token, so the base must share the vocabulary")
    return base_source


def merged_or_kept(adapter, adapters, keep_adapters: bool):
    """(the adapter to merge, the adapters to keep apart): `--adapter DIR` merges as always; `--adapter NAME=DIR`
    merges too when it is the only one, and is kept with the others under `keep_adapters`."""
    from .adapter_set import parse_adapters

    if adapters is None:
        if keep_adapters:
            raise EdgeqError("--keep-adapters needs the adapters to keep: pass --adapter NAME=DIR for each")
        return adapter, None
    if adapter is not None:
        raise EdgeqError("pass the adapters either as adapter= or as adapters=, not both")
    pairs = parse_adapters(adapters)
    if keep_adapters:
        return None, pairs
    if len(pairs) > 1:
        raise EdgeqError(f"{len(pairs)} adapters given: a bundle merges one; pass --keep-adapters to keep them apart "
                         "over one base, or export each adapter on its own")
    return pairs[0][1], None


def keep_adapters_for(source, spec: FormatSpec, pairs) -> list:
    """The kept adapters checked against the base and the format (refusals name the adapter and why)."""
    from .adapter_set import open_adapters

    if spec.kept_adapters is None:
        takers = [n for n in registry.formats.names() if registry.formats.get(n).kept_adapters]
        raise EdgeqError(f"the {spec.name} format cannot keep adapters apart from the base: {spec.kept_adapters_refusal}; "
                         f"export each adapter merged (--adapter DIR), or choose --format {' or '.join(takers)}")
    return open_adapters(source, pairs, spec.name)


def resolve(model, *, device, adapter, format, precision, calibration, calibration_tokens, output, overwrite, trust_pickle,
            size, bits_per_weight, tensor_types, options, eval_tokens, eval_ctx, eval_data, eval_data_tokens, base, targets,
            allow_quality_miss, progress, adapters=None, keep_adapters=False, adapter_data=None,
            compare_merged=False) -> ExportJob:
    """Every choice made and checked before any heavy work: format, precision or plan, data, targets, output path."""
    from edgeq.devices import load_device

    from .intake import open_model
    from .validate import BITS_PER_WEIGHT, CONTEXT, TOKENS, TOKENS_OR_ZERO, parse_size

    TOKENS.check("calibration_tokens", calibration_tokens)
    TOKENS.check("eval_data_tokens", eval_data_tokens)
    TOKENS_OR_ZERO.check("eval_tokens", eval_tokens)
    CONTEXT.check("eval_ctx", eval_ctx)
    if bits_per_weight is not None:
        BITS_PER_WEIGHT.check("bits_per_weight", bits_per_weight)
    if model is None:
        from .default_model import default_model_path

        model = default_model_path(progress=progress)
    profile = load_device(device) if device else None
    spec = choose_format(format, profile)
    options = format_options(spec, **options)
    size = parse_size(size) if size is not None else None
    planned = precision is None and (profile is not None or size is not None or bits_per_weight is not None or bool(targets))
    if planned and tensor_types:
        raise EdgeqError("per-tensor types apply to a forced --precision; without one, the plan chooses every tensor's type")
    chosen = spec.planned_precision if planned else choose_precision(precision, profile, spec)
    adapter, kept = merged_or_kept(adapter, adapters, keep_adapters)
    source = open_model(model, adapter=adapter, trust_pickle=trust_pickle)
    spec.check_source(source)
    kept = keep_adapters_for(source, spec, kept) if kept else []
    name = f"{Path(model).name}-{profile.id if profile else 'generic'}-{'planned' if planned else chosen.lower()}"
    out = Path(output) if output else Path(name)
    inputs = (model, adapter, calibration, eval_data, base)
    check_writable(out, overwrite, inputs)
    job = ExportJob(source, spec, chosen, planned, profile, out, overwrite, options, tensor_types,
                    Calibration(source, calibration, calibration_tokens), eval_tokens, eval_ctx, progress,
                    size=size, bits_per_weight=bits_per_weight, targets=targets, allow_quality_miss=allow_quality_miss,
                    inputs=inputs)
    if kept or adapter_data or compare_merged:
        from .adapter_quality import check_adapter_data
        from .validate import read_text_file

        if not kept:
            raise EdgeqError("per-adapter eval data and compare_merged measure adapters kept apart; pass --keep-adapters")
        job.adapters, job.compare_merged, job.eval_data_tokens = kept, compare_merged, eval_data_tokens
        job.adapter_data = check_adapter_data(adapter_data, [a.name for a in kept])
        for path in job.adapter_data.values():
            read_text_file(path, "adapter eval data")
    if eval_data is not None:
        from .eval_data import read_dataset

        context = min(EVAL_DATA_CTX, source.config.get("max_position_embeddings") or EVAL_DATA_CTX,
                      profile.context_length if profile else EVAL_DATA_CTX)  # what the bundle's engine will hold
        job.data = read_dataset(eval_data, source.chat_tokenizer(), tokens=eval_data_tokens, ctx=context)
        job.base_source = open_base(source, base, trust_pickle)
    elif base is not None:
        raise EdgeqError("--base is used to measure retention on --eval-data; pass --eval-data too")
    targets.check(job.data is not None, job.base_source is not None)
    return job


def check_memory(job: ExportJob) -> None:
    """Refuses up front, with the estimate, an export whose float reference would not fit in this machine's memory
    (an out-of-memory kill halfway through would waste the minutes before it)."""
    import math

    import psutil

    reasons = [why for why, needed in (
        ("a precision plan", job.planned), ("the quality check (--eval-tokens)", job.eval_tokens > 0),
        ("--eval-data", job.data is not None), ("GPTQ rounding", job.spec.rounds_by_gptq(job.precision, job.options.get("rounding"))),
        ("the importance matrix of --calibration", job.calibration.given)) if needed]
    if not reasons:
        return
    from .float_model import stored_16bit

    weights = sum(math.prod(shape) for shape in job.source.shapes().values())
    kept = 2 if stored_16bit(job.source) is not None else 4  # a large 16-bit model stays 16-bit (edgeq.float_model)
    needed = int(weights * kept * 1.15) + (512 << 20)  # the weights, activations and the runtime
    available = psutil.virtual_memory().available
    if needed > available:
        raise EdgeqError(f"this export loads the float model for {', '.join(reasons)}: about {needed / 2**30:.1f} GiB, "
                         f"and {available / 2**30:.1f} GiB is free; free memory, or drop what loads it "
                         "(--precision with --eval-tokens 0, --rounding nearest)")


def score_base(job: ExportJob) -> None:
    """The base model's scores on the eval data, before the fine-tune's float model is ever loaded."""
    if job.base_source is None:
        return
    job.workdir = Path(tempfile.mkdtemp(prefix="edgeq-export-"))
    engine = registry.runtimes.get(registry.REFERENCE_RUNTIME)(job.base_source)
    try:
        job.base = BaseScores(engine, job.data, job.workdir, job.progress)
    finally:
        engine.close()


def calibrate(job: ExportJob) -> None:
    """A planned export measures sensitivity on the calibration text and plans within the budget (or, with
    quality targets and no size, finds the smallest plan predicted to meet them); the importance matrix
    measured on the way stays with the job's calibration for the converter."""
    if not job.planned:
        return
    from .planning import budget_for, plan_from, sensitivity_for

    job.sensitivity = sensitivity_for(job.source, job.spec.name, job.calibration, job.progress)
    if job.targets and job.size is None and job.bits_per_weight is None:
        from .quant.targets import smallest_passing_plan

        cap = budget_for(job.sensitivity, job.source, job.spec.name, profile=job.profile) if job.profile else None
        job.plan, predicted = smallest_passing_plan(job.sensitivity, job.targets, simulator(job).measure, cap=cap, progress=job.progress)
        job.simulator.close()
        plan_from(job.plan, job.sensitivity, job.calibration)
        job.plan.sensitivity["predicted"] = predicted
    else:
        weights = None
        if job.size is not None:
            beside = overhead_bytes(job)
            weights = job.size - beside
            if weights <= 0:
                raise EdgeqError(f"--size {job.size} bytes leaves nothing for the weights: the tokenizer, metadata and manifest "
                                 f"alone take about {beside} bytes; allow a larger size")
        budget = budget_for(job.sensitivity, job.source, job.spec.name, profile=job.profile, size=weights,
                            bits_per_weight=job.bits_per_weight)
        job.plan = plan_from(None, job.sensitivity, job.calibration, budget=budget)
    job.overrides = job.plan.overrides()


def simulator(job: ExportJob):
    """The plan simulator over the job's float model and eval data (or, without data, the built-in sample)."""
    if job.simulator is None:
        from .eval_data import read_dataset
        from .generate import LanguageModel
        from .quant.targets import PlanSimulator

        data = job.data or read_dataset(DEFAULT_TEXT, job.source.chat_tokenizer(), tokens=job.eval_tokens or 1024, ctx=job.eval_ctx)
        replies = LanguageModel(job.calibration.engine, job.source.chat_tokenizer()) if job.targets.min_agreement is not None else None
        job.simulator = PlanSimulator(job.calibration.model, job.spec.space(), job.calibration.importance() or {}, data,
                                      job.base, replies)
    return job.simulator


def overhead_bytes(job: ExportJob) -> int:
    """Bytes on disk beside the weights: the copied tokenizer files, the format's own metadata (estimated by the
    format from the tokenizer's size) and the manifest. A planned bundle that still comes out larger is re-planned."""
    copied = sum((job.source.tokenizer_folder / n).stat().st_size for n in COPIED_FILES if (job.source.tokenizer_folder / n).is_file())
    template = len((job.source.chat_template() or "").encode())
    tensors = len(job.source.shapes())
    return copied + template + job.spec.file_overhead(job.source, tensors) + 400 * tensors + (8 << 10)


def convert(job: ExportJob, stage: Path) -> None:
    converter = job.spec.converter()
    kept = {"adapters": job.adapters} if job.adapters else {}
    trained = job.source.config.get("max_position_embeddings", DEFAULT_CONTEXT)
    if "context" in job.spec.options:  # a format whose cache is sized at export (ExecuTorch's static cache)
        kept["context"] = min(job.profile.context_length if job.profile else DEFAULT_CONTEXT, trained)
    fields = converter.convert(job.source, stage, precision=job.precision, overrides=job.overrides,
                               calibration=job.calibration, progress=job.progress, **job.options, **kept)
    _copy_tokenizer(job.source, stage)
    job.manifest = {
        "format": job.spec.name,
        "runtime": job.spec.runtime,
        **fields,
        "context_length": min(job.profile.context_length if job.profile else DEFAULT_CONTEXT, trained),
        "source": job.source.fingerprint(),
        "base": job.base_source.fingerprint() if job.base_source else None,
        "device": job.profile.to_dict() if job.profile else None,
        "calibration": job.calibration.describe(),
        "tokenizer": job.source.chat_tokenizer().spec.to_dict(),
        "plan": job.plan.to_dict() if job.plan else None,
    }
    if job.source.untied_head and job.adapters:
        job.manifest["untied_head"] = "the base ties lm_head to the embedding; it is written as a tensor of its own because an adapter adapts it"


def fits_size(job: ExportJob, stage: Path) -> bool:
    """A planned export with --size: is the staged bundle within it on disk? If not, the budget shrinks by the excess."""
    if job.size is None or not job.planned:
        return True
    on_disk = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file()) + 4096  # + the manifest's checksums
    if on_disk <= job.size:
        return True
    log.info("planned bundle is %d bytes on disk, over --size %d: planning again with %d bytes less", on_disk, job.size, on_disk - job.size)
    from .planning import plan_from

    job.plan = plan_from(None, job.sensitivity, job.calibration, budget=job.plan.budget_bytes - (on_disk - job.size) - 4096)
    job.overrides = job.plan.overrides()
    return False


def measure(job: ExportJob, stage: Path) -> None:
    """Quality of the staged bundle against the float reference before it lands: on a built-in sample, and on the
    user's eval data (fine-tune metrics) when given; then the targets, which fail the export on a miss."""
    if not job.eval_tokens and job.data is None and not job.targets and not job.adapter_data:
        return
    reference = job.calibration.engine  # loaded already if calibration used it
    # a format may name the engine that can measure it here (Core ML on Linux: coreml-torch)
    candidate = open_engine(stage, job.manifest, job.spec.eval_runtime)
    try:
        if job.eval_tokens:
            windows = calibration_windows(job.source.chat_tokenizer(), DEFAULT_TEXT, job.eval_tokens, job.eval_ctx)
            job.manifest["quality"] = compare(reference, candidate, windows, job.progress, text="built-in sample").to_dict()
            _guard(job.manifest)
        if job.data is not None:
            job.manifest["finetune_quality"] = finetune_quality(reference, candidate, job.data, tokenizer=job.source.chat_tokenizer(),
                                                                base=job.base, progress=job.progress).to_dict()
    finally:
        candidate.close()
    if job.plan and "quality" in job.manifest:
        job.manifest["plan_check"] = _plan_check(job.plan, job.manifest["quality"]["kl"], job.manifest.get("rounding"))
    if job.adapters and (job.eval_tokens or job.adapter_data):
        from .adapter_quality import measure_kept

        measure_kept(job, stage)


def _guard(manifest: dict) -> None:
    quality = manifest["quality"]
    if quality["ppl"] > PPL_GUARD * quality["ppl_ref"]:
        manifest["quality_warning"] = (f"perplexity {quality['ppl']:.2f} is over {PPL_GUARD}x the original's "
                                       f"{quality['ppl_ref']:.2f} (KL {quality['kl']:.3f}): this export lost much of the model")
        log.warning("%s; try a larger precision or --calibration with text like the model's input", manifest["quality_warning"])


def check_targets(job: ExportJob, retry: bool) -> bool:
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
    searched = job.sensitivity is not None and job.size is None and job.bits_per_weight is None
    if searched and retry:
        try:
            job.plan = _corrected_plan(job, measured)
            job.overrides = job.plan.overrides()
            log.info("measured %s; converting the next plan predicted to pass", "; ".join(misses))
            return False
        except EdgeqError:
            pass
    hint = _passing_size_hint(job, measured)
    if job.allow_quality_miss:
        job.manifest["targets"]["misses"] = misses
        log.warning("the export misses its target (%s)%s; kept because of --allow-quality-miss", "; ".join(misses), hint)
        return True
    raise EdgeqError(f"the export misses its target: {'; '.join(misses)}{hint}; nothing was written "
                     "(--allow-quality-miss keeps it anyway)")


def _corrected_plan(job: ExportJob, measured: dict):
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


def _passing_size_hint(job: ExportJob, measured: dict) -> str:
    if job.sensitivity is None:
        return "; try a larger --precision"
    try:
        plan = _corrected_plan(job, measured)
    except EdgeqError as exc:
        return f"; {exc}"
    return f"; the smallest size predicted to pass is {(plan.total_bytes + overhead_bytes(job)) / 2**20:.2f} MiB (--size)"


def land(job: ExportJob, stage: Path) -> None:
    write_manifest(stage, job.manifest)


class _Again(Exception):
    """A staged bundle that is not the one to land (over --size, or missing a target it was planned for):
    the stage is dropped and the new plan converted."""


def _build(job: ExportJob, retry: bool) -> bool:
    """One staged attempt: convert, check the size on disk, measure, check the targets, land. False when the
    plan was made again (too large on disk, or a target missed) and is to be converted anew."""
    try:
        with staged_bundle(job.output, job.overwrite, job.inputs) as stage:
            convert(job, stage)
            if not fits_size(job, stage):
                raise _Again
            measure(job, stage)
            if job.targets and not check_targets(job, retry):
                raise _Again
            land(job, stage)
        return True
    except _Again:
        return False


def export(model: str | Path | None = None, *, device: str | Path | None = None, adapter: str | Path | None = None,
           format: str | None = None, precision: str | None = None, calibration: str | Path | None = None,
           output: str | Path | None = None, overwrite: bool = False, trust_pickle: bool = False,
           size: str | int | None = None, bits_per_weight: float | None = None,
           calibration_tokens: int = 8192, eval_tokens: int = 1024, eval_ctx: int = 256,
           eval_data: str | Path | None = None, eval_data_tokens: int = 2048, base: str | Path | None = None,
           max_kl: float | None = None, min_retention: float | None = None, min_agreement: float | None = None,
           allow_quality_miss: bool = False,
           mobile: bool = False, block_size: int | None = None, rounding: str | None = None, tensor_types: dict[str, str] | None = None,
           adapters: dict | list | None = None, keep_adapters: bool = False, adapter_data: dict | None = None,
           compare_merged: bool = False, progress: bool | None = None) -> Path:
    """Exports a Hugging Face model (and LoRA adapter) into a bundle for a device; returns the bundle path.

    With no model, the built-in default (SmolLM2-135M-Instruct) is used. The format defaults to
    what the device runs best. Without `precision`, a device (or `size` / `bits_per_weight`, or a quality
    target) makes edgeq plan a precision per tensor from measured sensitivity; `precision` forces one type.
    `size` is the bundle's size on disk. `calibration` (text or JSONL chats) feeds the importance matrix,
    GPTQ and the sensitivity measurement. `eval_data` (text, JSONL chats or prompt/completion) judges the
    export on the fine-tune's own data, assistant tokens only; with an adapter (or `base=`) also how much of
    the fine-tune's change survives (flip retention, noise-to-shift). Targets `max_kl`, `min_retention`,
    `min_agreement`: without a size, the smallest plan predicted to meet them; a measured miss fails the
    export (nothing is written) unless `allow_quality_miss`. `tensor_types` (HF tensor name → precision)
    makes exceptions to a forced precision. Format options: `mobile` (onnx: also the ORT format),
    `block_size` (onnx int4), `rounding` (onnx int4/int8: "gptq", the default, or "nearest", seconds instead of minutes; coreml int4:
    "nearest", the default, or "gptq").
    `adapters` ({name: folder}) with `keep_adapters`: the base is converted once and each LoRA adapter written as
    its own file in the engine's adapter form, switched per request (`generate(adapter=name)`); each is measured
    separate (and, with `compare_merged`, merged then quantized) against its float merged model, on
    `adapter_data[name]` when given.
    """
    targets = Targets(max_kl, min_retention, min_agreement)
    job = resolve(model, device=device, adapter=adapter, format=format, precision=precision, calibration=calibration,
                  calibration_tokens=calibration_tokens, output=output, overwrite=overwrite, trust_pickle=trust_pickle,
                  size=size, bits_per_weight=bits_per_weight, tensor_types=tensor_types,
                  options={"mobile": mobile, "block_size": block_size, "rounding": rounding},
                  eval_tokens=eval_tokens, eval_ctx=eval_ctx, eval_data=eval_data, eval_data_tokens=eval_data_tokens,
                  base=base, targets=targets, allow_quality_miss=allow_quality_miss, progress=progress,
                  adapters=adapters, keep_adapters=keep_adapters, adapter_data=adapter_data, compare_merged=compare_merged)
    try:
        check_memory(job)
        job.source.hash_in_background()
        score_base(job)
        calibrate(job)
        if not any(_build(job, retry=attempt < RETRIES) for attempt in range(RETRIES + 1)):
            raise EdgeqError(f"the planned bundle stays over --size ({job.size} bytes) on disk; allow a larger size")
    finally:
        if job.workdir:
            shutil.rmtree(job.workdir, ignore_errors=True)
    log.info("bundle written to %s", job.output)
    return job.output


def _copy_tokenizer(source, stage: Path) -> None:
    for name in COPIED_FILES:
        for folder in (source.tokenizer_folder, source.path):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, stage / name)
                break
    template = source.chat_template()
    if template:
        (stage / CHAT_TEMPLATE_FILE).write_text(template)


def _plan_check(plan, measured_kl: float, rounding: str | None) -> dict:
    """The planner's prediction beside the measured KL; a gap of more than 2× either way is reported.
    The prediction prices rounding each tensor alone: under GPTQ rounding it is an upper bound, so only
    a measured KL above it by 2× is a surprise."""
    ratio = measured_kl / plan.predicted_kl if plan.predicted_kl else float("inf")
    check = {"predicted_kl": round(plan.predicted_kl, 6), "measured_kl": round(measured_kl, 6), "ratio": round(ratio, 3)}
    if ratio > 2.0 or (ratio < 0.5 and rounding != "gptq"):
        check["note"] = "measured KL differs from the prediction by more than 2x: the sensitivity sample or text may not fit this model"
        log.warning("plan check: %s (predicted %.4f, measured %.4f)", check["note"], plan.predicted_kl, measured_kl)
    return check
