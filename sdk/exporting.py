"""`edgeq.export()`: model (+ adapter) → converter → bundle, with its quality measured before it lands."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from . import registry
from .bundle import check_writable, staged_bundle, write_manifest
from .errors import EdgeqError
from .evaluate import DEFAULT_TEXT, compare
from .importance import Calibration, calibration_windows, compute_importance
from .loading import CHAT_TEMPLATE_FILE, open_engine

log = logging.getLogger(__name__)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DEFAULT_CONTEXT = 4096


def choose_format(fmt: str | None, profile) -> str:
    if fmt:
        registry.converters.get(fmt)  # fails with the list of known formats
        return fmt
    if profile is None:
        return "gguf"
    available = set(registry.converters.names())
    for candidate in profile.formats:
        if candidate in available:
            return candidate
    raise EdgeqError(f"device {profile.id} runs {', '.join(profile.formats)}, none of which this edgeq can export; pass --format")


def choose_precision(precision: str | None, profile, fmt: str, converter) -> str:
    if precision:
        return precision
    if profile is not None:
        for candidate in profile.precisions.get(fmt, []):
            if candidate.upper() in {p.upper() for p in converter.precisions}:
                return candidate
    return converter.default_precision


def converter_options(converter, fmt: str, **asked) -> dict:
    """The format options that were set; a format without such an option refuses it before any work."""
    given = {name: value for name, value in asked.items() if value not in (None, False)}
    for name in given:
        if name not in getattr(converter, "options", ()):
            raise EdgeqError(f"--{name.replace('_', '-')} does not apply to the {fmt} format; drop it or choose --format onnx")
    return given


def _copy_tokenizer(source, stage: Path) -> None:
    for name in COPIED_FILES:
        for folder in (source.tokenizer_folder, source.path):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, stage / name)
                break
    template = source.chat_template()
    if template:
        (stage / CHAT_TEMPLATE_FILE).write_text(template)


def _calibration_record(text, tokens: int, calib, fields: dict) -> dict | None:
    """Which text shaped the weights, if any did (a converter may have had one and not used it)."""
    if calib is not None:
        return calib.describe() if fields.get("rounding") in ("gptq", "importance-weighted") else None
    return {"text": str(text), "tokens": tokens} if text else None


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


def export(model: str | Path | None = None, *, device: str | Path | None = None, adapter: str | Path | None = None,
           format: str | None = None, precision: str | None = None, calibration: str | Path | None = None,
           output: str | Path | None = None, overwrite: bool = False, trust_pickle: bool = False,
           size: str | int | None = None, bits_per_weight: float | None = None,
           calibration_tokens: int = 8192, eval_tokens: int = 1024, eval_ctx: int = 256,
           mobile: bool = False, block_size: int | None = None, rounding: str | None = None, tensor_types: dict[str, str] | None = None,
           progress: bool | None = None) -> Path:
    """Exports a Hugging Face model (and LoRA adapter) into a bundle for a device; returns the bundle path.

    With no model, the built-in default (SmolLM2-135M-Instruct) is used. The format defaults to
    what the device runs best. Without `precision`, a device (or `size` / `bits_per_weight`) makes
    edgeq plan a precision per tensor from measured sensitivity; `precision` forces one type.
    A calibration text feeds the importance matrix and the sensitivity measurement. `tensor_types`
    (HF tensor name → precision) makes exceptions to a forced precision, e.g. `{"lm_head.weight": "int4"}`.
    Format options: `mobile` (onnx: also the ORT format for ONNX Runtime Mobile), `block_size` (onnx int4),
    `rounding` (onnx int4/int8: "gptq", the default, rounds with error feedback on the calibration text or
    edgeq's built-in one; "nearest" rounds each block alone, in seconds instead of minutes).
    """
    from edgeq.devices import load_device
    from .intake import open_model

    if model is None:
        from .default_model import default_model_path

        model = default_model_path(progress=progress)
    profile = load_device(device) if device else None
    fmt = choose_format(format, profile)
    converter = registry.converters.get(fmt)()
    options = converter_options(converter, fmt, mobile=mobile, block_size=block_size, rounding=rounding)
    planned = precision is None and (profile is not None or size is not None or bits_per_weight is not None)
    if planned and tensor_types:
        raise EdgeqError("per-tensor types apply to a forced --precision; without one, the plan chooses every tensor's type")
    precision = converter.planned_precision if planned else choose_precision(precision, profile, fmt, converter)
    source = open_model(model, adapter=adapter, trust_pickle=trust_pickle)
    out = Path(output) if output else Path(f"{Path(model).name}-{profile.id if profile else 'generic'}-{'planned' if planned else precision.lower()}")
    check_writable(out, overwrite)
    tokenizer = source.chat_tokenizer()

    plan = importance = None
    if planned:
        from .planning import plan_for

        plan, importance = plan_for(source, fmt, profile=profile, size=size, bits_per_weight=bits_per_weight,
                                    calibration=calibration, progress=progress)
    # The float reference is as large as the model in fp32: it is loaded only where needed, so the
    # conversion itself streams with peak memory near the largest tensor (and torch is not even imported).
    # A converter that takes the calibration itself (ONNX: GPTQ) gets the text, with the built-in one as default,
    # and loads the model only if it rounds that way; the others get an importance matrix when given a text.
    reference = calib = None
    if getattr(converter, "takes_calibration", False):
        calib = options["calibration"] = Calibration(source, calibration, calibration_tokens)
    elif calibration and not planned:
        from edgeq.runtimes.torch import TorchEngine

        reference = TorchEngine(source)
        windows = calibration_windows(tokenizer, Path(calibration), calibration_tokens, 512)
        importance = compute_importance(reference.model, windows, progress)

    with staged_bundle(out, overwrite) as stage:
        fields = converter.convert(source, stage, precision=precision, importance=importance, progress=progress,
                                   overrides=plan.overrides() if plan else tensor_types, **options)
        _copy_tokenizer(source, stage)
        trained = source.config.get("max_position_embeddings", DEFAULT_CONTEXT)
        manifest = {
            "format": fmt,
            "runtime": converter.runtime,
            **fields,
            "context_length": min(profile.context_length if profile else DEFAULT_CONTEXT, trained),
            "source": source.fingerprint(),
            "device": profile.to_dict() if profile else None,
            "calibration": _calibration_record(calibration, calibration_tokens, calib, fields),
            "tokenizer": tokenizer.spec.to_dict(),
            "plan": plan.to_dict() if plan else None,
        }
        if eval_tokens:
            from edgeq.runtimes.torch import TorchEngine

            reference = reference or (calib and calib.engine) or TorchEngine(source)
            # a converter may name the engine that can measure its format here (Core ML on Linux: coreml-torch)
            candidate = open_engine(stage, manifest, getattr(converter, "eval_runtime", None))
            try:
                windows = calibration_windows(tokenizer, DEFAULT_TEXT, eval_tokens, eval_ctx)
                manifest["quality"] = compare(reference, candidate, windows, progress, text="built-in sample").to_dict()
            finally:
                candidate.close()
            if plan:
                manifest["plan_check"] = _plan_check(plan, manifest["quality"]["kl"], fields.get("rounding"))
        write_manifest(stage, manifest)
    log.info("bundle written to %s", out)
    return out


def evaluate(bundle: str | Path, *, text: str | Path | None = None, tokens: int = 4096, ctx: int = 512,
             reference: str | Path | None = None, backend: str | None = None, threads: int | None = None,
             progress: bool | None = None):
    """Measures a bundle against the torch reference on the same tokens: KL, top-1, perplexity.

    The reference is the source model the manifest names (with its adapter), or `reference=`. Without
    `backend`, the format's converter may name the runtime that measures it here (Core ML off macOS:
    `coreml-torch`, the package's weights in torch); else the manifest's runtime.
    """
    from edgeq.runtimes.torch import TorchEngine

    from .bundle import read_manifest
    from .intake import open_model
    from .loading import bundle_tokenizer

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    src = manifest.get("source") or {}
    ref_path = Path(reference) if reference else Path(src.get("path", ""))
    if not (ref_path / "config.json").is_file():
        raise EdgeqError(f"the reference model {ref_path} is not there; pass --reference with the source model folder")
    adapter = None if reference else (src.get("adapter") or {}).get("path")
    reference_engine = TorchEngine(open_model(ref_path, adapter=adapter), threads=threads)
    backend = backend or getattr(registry.converters.get(manifest["format"])(), "eval_runtime", None)
    candidate = open_engine(bundle, manifest, backend, threads, n_ctx=max(ctx, manifest.get("context_length") or 0))
    try:
        windows = calibration_windows(bundle_tokenizer(bundle, manifest), Path(text) if text else DEFAULT_TEXT, tokens, ctx)
        return compare(reference_engine, candidate, windows, progress, text=str(text) if text else "built-in sample")
    finally:
        candidate.close()
