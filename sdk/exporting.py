"""`edgeq.export()`: resolve → calibrate → convert → measure → land.

Each step is one function over an `ExportJob`, so the order of work (and what each step may load) reads
top to bottom in `run()`. The float reference is as large as the model in fp32: it loads only when a step
needs it (a plan, GPTQ, an importance matrix, the quality check) and once, as the job's `FloatReference`,
which the calibration is handed; the conversion itself streams tensor by tensor. Measuring the staged
bundle, and what a miss of a quality target does, is `edgeq.export_checks`.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import registry
from .bundle import check_writable, copy_tokenizer, staged_bundle, write_manifest
from .errors import EdgeqError
from .export_checks import check_targets, measure
from .export_options import ExportOptions
from .export_planning import calibrate, fits_size
from .export_rotation import choose_rotation, rotate_job, rotation_manifest
from .formats import FormatSpec
from .model_card import write_card
from .model_shape import ModelShape
from .quality import BaseScores
from .quant.calibration import Calibration

log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 4096
EVAL_DATA_CTX = 1024
RETRIES = 2  # re-plans when a planned bundle comes out larger on disk than --size, or misses the target it was planned for


@dataclass
class ExportJob:
    """What was asked (`opts`), resolved: the source, the format's spec, the precision or plan, where it lands,
    and what the steps found on the way."""

    opts: ExportOptions
    source: object
    spec: FormatSpec
    precision: str
    planned: bool
    profile: object | None
    output: Path
    options: dict                       # the format options that were set
    overrides: dict[str, str] | None
    reference: object                   # edgeq.float_model.FloatReference: the float model, opened once on first use
    calibration: Calibration
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
    adapter_data: dict = field(default_factory=dict)    # adapter name → its eval data file
    rotation: dict | None = None        # what rotate= did (edgeq.export_rotation), for the manifest
    rotate: str = "off"                 # the rotation run: asked, or the format's default (`choose_rotation`)
    rotate_declined: str | None = None  # why the format's default rotation does not run on this model

    @property
    def targets(self):
        return self.opts.targets

    @property
    def progress(self) -> bool | None:
        return self.opts.progress

    @property
    def context(self) -> int:
        """Tokens the bundle's engine holds: the device's context, else DEFAULT_CONTEXT, capped by the trained one."""
        trained = self.source.config.get("max_position_embeddings", DEFAULT_CONTEXT)
        return min(self.profile.context_length if self.profile else DEFAULT_CONTEXT, trained)


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


def merged_or_kept(adapter, adapters, keep_adapters: bool):
    """(the adapter to merge, the adapters to keep apart): `--adapter DIR` merges as always; `--adapter NAME=DIR`
    merges too when it is the only one, and is kept with the others under `keep_adapters`."""
    from .adapter_set import parse_adapters

    if adapters is None:
        if keep_adapters:
            raise EdgeqError("--keep-adapters needs the adapters to keep: pass --adapter NAME=DIR for each")
        return adapter, None
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


def resolve(opts: ExportOptions) -> ExportJob:
    """Every choice made and checked before any heavy work: format, precision or plan, data, targets, output path."""
    from edgeq.devices import load_device

    from .float_model import FloatReference
    from .intake import open_base, open_model

    model = opts.model
    if model is None:
        from .default_model import default_model_path

        model = default_model_path(progress=opts.progress)
    profile = load_device(opts.device) if opts.device else None
    spec = choose_format(opts.format, profile)
    options = format_options(spec, **opts.format_options)
    if opts.kv_cache not in (None, "auto"):
        spec.kv_bytes_per_element(opts.kv_cache)  # a type the format's runtime cannot store: refused by name
    planned = opts.wants_plan
    if planned and opts.tensor_types:
        raise EdgeqError("per-tensor types apply to a forced --precision; without one, the plan chooses every tensor's type")
    chosen = spec.planned_precision if planned else choose_precision(opts.precision, profile, spec)
    adapter, kept = merged_or_kept(opts.adapter, opts.adapters, opts.keep_adapters)
    source = open_model(model, adapter=adapter, trust_pickle=opts.trust_pickle, revision=opts.revision, progress=opts.progress)
    spec.check_source(source)
    if opts.kv_cache not in (None, "auto"):
        from .quant.kv_cache import check_cache_type

        check_cache_type(opts.kv_cache, ModelShape.from_config(source.config).head_dim)
    rotate, rotate_declined = choose_rotation(opts, spec, chosen, bool(kept), source)
    kept = keep_adapters_for(source, spec, kept) if kept else []
    name = f"{source.name}-{profile.id if profile else 'generic'}-{'planned' if planned else chosen.lower()}"
    out = Path(opts.output) if opts.output else Path(name)
    inputs = (*source.inputs, opts.calibration, opts.eval_data, opts.base)
    check_writable(out, opts.overwrite, inputs)
    reference = FloatReference(source)
    job = ExportJob(opts, source, spec, chosen, planned, profile, out, options, opts.tensor_types, reference,
                    Calibration(source, opts.calibration, opts.calibration_tokens, reference=reference), inputs=inputs,
                    rotate=rotate, rotate_declined=rotate_declined)
    if kept or opts.adapter_data or opts.compare_merged:
        from .adapter_quality import check_adapter_data
        from .validate import read_text_file

        if not kept:
            raise EdgeqError("per-adapter eval data and compare_merged measure adapters kept apart; pass --keep-adapters")
        job.adapters = kept
        job.adapter_data = check_adapter_data(opts.adapter_data, [a.name for a in kept])
        for path in job.adapter_data.values():
            read_text_file(path, "adapter eval data")
    if opts.eval_data is not None:
        from .eval_data import read_dataset

        context = min(EVAL_DATA_CTX, source.config.get("max_position_embeddings") or EVAL_DATA_CTX,
                      profile.context_length if profile else EVAL_DATA_CTX)  # what the bundle's engine will hold
        job.data = read_dataset(opts.eval_data, source.chat_tokenizer(), tokens=opts.eval_data_tokens, ctx=context)
        job.base_source = open_base(source, opts.base, opts.trust_pickle)
    elif opts.base is not None:
        raise EdgeqError("--base is used to measure retention on --eval-data; pass --eval-data too")
    opts.targets.check(job.data is not None, job.base_source is not None)
    return job


def check_memory(job: ExportJob) -> None:
    """Refuses up front, with the estimate, an export whose float reference would not fit in this machine's memory
    (an out-of-memory kill halfway through would waste the minutes before it)."""
    import math

    import psutil

    reasons = [why for why, needed in (
        ("a precision plan", job.planned), ("the quality check (--eval-tokens)", job.opts.eval_tokens > 0),
        ("--eval-data", job.data is not None), ("GPTQ rounding", job.spec.rounds_by_gptq(job.precision, job.options.get("rounding"), job.calibration.given)),
        ("the importance matrix of --calibration", job.calibration.given), ("--rotate", job.rotate != "off")) if needed]
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


def convert(job: ExportJob, stage: Path) -> None:
    from .model_card import source_facts

    converter = job.spec.converter()
    extra = {"adapters": job.adapters} if job.adapters else {}
    context = job.context
    if "context" in job.spec.options:  # a format whose cache is sized at export (ExecuTorch's static cache)
        extra["context"] = context
    fields = converter.convert(job.source, stage, precision=job.precision, overrides=job.overrides,
                               calibration=job.calibration, progress=job.progress, **job.options, **extra)
    copy_tokenizer(job.source, stage)
    job.manifest = {
        "format": job.spec.name,
        "runtime": job.spec.runtime,
        **fields,
        "context_length": context,
        "source": {**job.source.fingerprint(), **source_facts(job.source)},
        "base": job.base_source.fingerprint() if job.base_source else None,
        "device": job.profile.to_dict() if job.profile else None,
        "calibration": job.calibration.describe(),
        "tokenizer": job.source.chat_tokenizer().spec.to_dict(),
        "plan": job.plan.to_dict() if job.plan else None,
    }
    if job.spec.kv_cache_types:  # what the runtime is to allocate, and what it costs per token
        cache_type = kv_cache_type(job)
        element = job.spec.kv_bytes_per_element(cache_type)
        job.manifest["kv_cache"] = {"type": cache_type, "context": context,
                                    "bytes_per_token": ModelShape.from_config(job.source.config).kv_bytes_per_token(element)}
    if job.rotation is not None:
        job.manifest["rotation"] = rotation_manifest(job, fields)
    if job.source.untied_head and job.adapters:
        job.manifest["untied_head"] = "the base ties lm_head to the embedding; it is written as a tensor of its own because an adapter adapts it"


def kv_cache_type(job: ExportJob) -> str:
    """The KV cache type the bundle asks its runtime for: the plan's choice, else the one asked, else the default."""
    planned = (job.plan.kv_cache or {}).get("type") if job.plan is not None else None
    asked = job.opts.kv_cache if job.opts.kv_cache not in (None, "auto") else None
    return planned or asked or next(iter(job.spec.kv_cache_types))


class _Again(Exception):
    """A staged bundle that is not the one to land (over --size, or missing a target it was planned for):
    the stage is dropped and the new plan converted."""


def _build(job: ExportJob, retry: bool) -> bool:
    """One staged attempt: convert, check the size on disk, measure, check the targets, land. False when the
    plan was made again (too large on disk, or a target missed) and is to be converted anew."""
    try:
        with staged_bundle(job.output, job.opts.overwrite, job.inputs) as stage:
            convert(job, stage)
            if not fits_size(job, stage):
                raise _Again
            measure(job, stage)
            if job.targets and not check_targets(job, retry):
                raise _Again
            write_card(stage, write_manifest(stage, job.manifest), job.output.name)
        return True
    except _Again:
        return False


def run(opts: ExportOptions) -> Path:
    """The export `opts` asks for; returns the bundle's path."""
    job = resolve(opts)
    try:
        check_memory(job)
        job.source.hash_in_background()
        score_base(job)
        rotate_job(job, convert)
        calibrate(job)
        if not any(_build(job, retry=attempt < RETRIES) for attempt in range(RETRIES + 1)):
            raise EdgeqError(f"the planned bundle stays over --size ({opts.size} bytes) on disk; allow a larger size")
    finally:
        job.reference.release()
        if job.workdir:
            shutil.rmtree(job.workdir, ignore_errors=True)
    log.info("bundle written to %s", job.output)
    return job.output


def export(model: str | Path | None = None, **options) -> Path:
    """Exports a model (and LoRA adapter) into a bundle for a device; returns the bundle path.

    `model` is a Hugging Face folder, a hub id (`org/name` at `revision`, from the hub cache when offline;
    `org/name:Q4_K_M` for a repo of GGUFs) or a GGUF file (dequantized; quality is measured against it).
    With no model, the built-in default (SmolLM2-135M-Instruct) is used. The format defaults to what the
    device runs best. Without `precision`, a `device` (or `size` / `bits_per_weight`, or a quality target)
    makes edgeq plan a precision per tensor from measured sensitivity; `precision` forces one type.
    `size` is the bundle's size on disk. `calibration` (text or JSONL chats; `calibration_tokens` of it) feeds
    the importance matrix, GPTQ and the sensitivity measurement. `eval_tokens` (0 skips it) of a built-in
    sample, in windows of `eval_ctx`, measure the export; `eval_data` (text, JSONL chats or prompt/completion;
    `eval_data_tokens` of it) judges it on the fine-tune's own data, assistant tokens only; with an `adapter`
    (or `base=`) also how much of the fine-tune's change survives (flip retention, noise-to-shift). Targets
    `max_kl`, `min_retention`, `min_agreement`: without a size, the smallest plan predicted to meet them; a
    measured miss fails the export (nothing is written) unless `allow_quality_miss`. `tensor_types` (HF tensor
    name → precision) makes exceptions to a forced precision. Format options: `mobile` (onnx: also the ORT
    format), `block_size` (onnx int4), `rounding` (onnx int4/int8: "gptq", the default, or "nearest", seconds
    instead of minutes; coreml int4: "nearest", the default, or "gptq"; gguf: "gptq", the default with
    `calibration`, or "nearest", llama.cpp's own). `effort` ("fast", "standard", the default, or "max") chooses
    the rounding the same way for every format (`edgeq.quant.effort`); give it or `rounding`, not both. `output`, `overwrite` (an edgeq
    bundle only), `trust_pickle` (.bin weights), `progress` (bars; default: on a terminal).
    `adapters` ({name: folder}) with `keep_adapters`: the base is converted once and each LoRA adapter written as
    its own file in the engine's adapter form, switched per request (`generate(adapter=name)`); each is measured
    separate (and, with `compare_merged`, merged then quantized) against its float merged model, on
    `adapter_data[name]` when given. Every option is a field of `edgeq.export_options.ExportOptions`.
    """
    return run(ExportOptions.of(model, **options))
