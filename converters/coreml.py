"""HF checkpoint → Core ML `.mlpackage` with a stateful KV cache (iOS 18 / macOS 15).

edgeq's own torch decoder (`edgeq.decoder`) is traced twice, for a prefill chunk of
`PREFILL_TOKENS` and for one decode token, and converted with the KV cache as Core ML state and
float16 compute. Each function is compressed with coremltools.optimize (int8 per channel, int4 in
blocks of 32 (or 16/64/128), 4/6-bit k-means palettes; per-weight exceptions from the precision plan by op name),
then both are merged into one multifunction package: identical weights are stored once and the
two functions share the state, so an app prefills with `prefill` and generates with `decode`.

Memory: the decoder is traced with float32 parameters. coremltools' torch frontend computes in
float32 until its float16 pass, so float16 parameters each got a float32 copy beside them; float32
ones it uses in place, and the pass adds one float16 copy. That pass is `lean_fp16_cast`, whose
overflow check does not index whole weights. Each function is converted and saved before the
next, and compression works on one saved function at a time: the peak is a function's conversion,
about 6 bytes per parameter (float32 + float16 weights) plus 1 GiB (measured peaks: bench/README.md).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
from pathlib import Path

import coremltools as ct
import numpy as np
import torch
from coremltools.converters.mil.mil.passes.defs.quantization import add_fp16_cast
from coremltools.converters.mil.mil.passes.pass_registry import register_pass

from edgeq.decoder import DecoderSpec, build_decoder
from edgeq.errors import EdgeqError
from edgeq.formats import warn_mismatches
from edgeq.intake import SourceModel
from edgeq.progress import bar

from .coreml_format import COREML, INT4_BLOCKS
from .coreml_package import describe, weight_ops

log = logging.getLogger(__name__)
MODEL_FILE = "model.mlpackage"
PREFILL_TOKENS = 64     # one prefill call processes this many prompt tokens (the last chunk is padded)
MAX_CONTEXT = 4096      # KV cache slots in the package (capped by the model's trained context)
FUNCTIONS = (("decode", 1), ("prefill", PREFILL_TOKENS))


def compressor(precision: str):
    """The coremltools op config of a precision name (None: stays float16)."""
    import coremltools.optimize.coreml as cto

    if precision == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0)
    if precision in INT4_BLOCKS:
        return cto.OpLinearQuantizerConfig(mode="linear", dtype="int4", granularity="per_block", block_size=INT4_BLOCKS[precision],
                                           weight_threshold=0)
    if precision.startswith("palettize"):
        return cto.OpPalettizerConfig(mode="kmeans", nbits=int(precision[-1]), granularity="per_grouped_channel",
                                      group_size=16, weight_threshold=0)
    return None


def precision_plan(spec: DecoderSpec, shapes: dict, precision: str, overrides: dict[str, str] | None) -> dict[str, str]:
    """HF weight name → precision for every matrix the decoder uses; checks the overrides."""
    matrices = [n for n, s in shapes.items() if len(s) == 2 and not (spec.tied and n == "lm_head.weight")]
    plan = dict.fromkeys(matrices, precision)
    plan.update(COREML.check_overrides(overrides, matrices, shapes))
    return plan


@register_pass(namespace="edgeq", override=True)
class lean_fp16_cast(add_fp16_cast):
    """coremltools' float16 compute pass with an overflow check that scans each float32 weight in
    slices: theirs builds np.where indices of the whole weight, 33 bytes per element with its
    absolute values (7.7 GB for the embedding of a 1.5B model), which was the peak of the export."""

    @staticmethod
    def fp16_overflow(op) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else (inputs,):
                if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                    flat = np.asarray(var.op.val.val).reshape(-1)
                    for start in range(0, flat.size, 1 << 20):
                        size = np.abs(flat[start:start + (1 << 20)])
                        if ((size > 65504) & (size < 1e38)).any():  # infinities may overflow, as in theirs
                            return True
        return False


def fp16_pipeline():
    """coremltools' default passes with `lean_fp16_cast` in place of `add_fp16_cast`."""
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.passes = ["edgeq::lean_fp16_cast" if p == "common::add_fp16_cast" else p for p in pipeline.passes]
    return pipeline


def convert_function(decoder, tokens: int):
    """Traces the decoder for `tokens` inputs per call and converts it with the cache as state."""
    ids = torch.zeros(1, tokens, dtype=torch.int32)
    positions = torch.arange(tokens, dtype=torch.int32).view(1, -1)
    with torch.no_grad():
        traced = torch.jit.trace(decoder, (ids, positions), check_trace=False)
    decoder.reset()  # tracing ran the model once and wrote into the cache
    shape = tuple(decoder.key_cache.shape)
    states = [ct.StateType(ct.TensorType(shape=shape, dtype=np.float16), name=name) for name in ("key_cache", "value_cache")]
    return ct.convert(
        traced,
        inputs=[ct.TensorType("input_ids", (1, tokens), dtype=np.int32), ct.TensorType("position_ids", (1, tokens), dtype=np.int32)],
        outputs=[ct.TensorType("logits", dtype=np.float16)],
        states=states,
        minimum_deployment_target=ct.target.iOS18,
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        pass_pipeline=fp16_pipeline(),
        skip_model_load=True,
    )


def compress(model_path: Path, out: Path, plan: dict[str, str], op_names: dict[str, str]) -> None:
    """Applies the plan by op name: palettes first, then linear quantization (one pass each)."""
    import coremltools.optimize.coreml as cto

    model = ct.models.MLModel(str(model_path), skip_model_load=True)
    for kind, apply in (("palettize", cto.palettize_weights), ("int", cto.linear_quantize_weights)):
        configs = {op_names[name]: compressor(p) for name, p in plan.items() if p.startswith(kind) and name in op_names}
        if configs:
            model = apply(model, cto.OptimizationConfig(op_name_configs=configs))
    model.save(str(out))


def functions(adapters=()) -> list[tuple[str, int, object]]:
    """(function name, tokens per call, the kept adapter it runs or None) of every function the package holds."""
    from .coreml_adapters import function_name

    return [(name, tokens, None) for name, tokens in FUNCTIONS] + [
        (function_name(name, adapter.name), tokens, adapter) for adapter in adapters for name, tokens in FUNCTIONS]


def merge(work: Path, out: Path, names: list[str]) -> None:
    desc = ct.utils.MultiFunctionDescriptor()
    for function in names:
        desc.add_function(str(work / f"{function}.mlpackage"), src_function_name="main", target_function_name=function)
    desc.default_function_name = "decode"
    ct.utils.save_multifunction(desc, str(out))


def convert_functions(spec: DecoderSpec, source: SourceModel, work: Path, progress, adapters=()) -> dict[str, dict[str, str]]:
    """Converts every function from one float32 decoder (float16 cache), saving each before the next (an adapter's
    with its LoRA branches over the same base parameters); returns, per function, HF weight name → the op name
    coremltools gave that weight (what compression targets)."""
    from .coreml_adapters import applied

    decoder = build_decoder(spec, source.tensor, dtype=torch.float32, cache_dtype=torch.float16, progress=progress)
    names = decoder.weight_names()
    op_names = {}
    todo = functions(adapters)
    with bar(len(todo), "Core ML convert", "function", progress) as pbar:
        for function, tokens, adapter in todo:
            with applied(decoder, adapter) as traced:
                model = _step(f"convert the {function} function", convert_function, traced, tokens)
            ops = weight_ops(model._mil_program.functions["main"], names)
            op_names[function] = {name: op.name for name, op in ops.items()}
            model.save(str(work / f"{function}-fp16.mlpackage"))
            del model, ops
            gc.collect()
            pbar.update(1)
    return op_names


def _step(what: str, fn, *args):
    """Runs one coremltools step, turning its failures into one actionable line."""
    try:
        return fn(*args)
    except (EdgeqError, MemoryError):
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgeqError(f"coremltools failed to {what} ({first}); rerun with --debug and report it") from exc


class CoreMLConverter:
    """`edgeq export --format coreml`: a multifunction `.mlpackage` (prefill + decode, shared state)."""

    spec = COREML

    def convert(self, source: SourceModel, stage: Path, *, precision: str, overrides: dict[str, str] | None = None,
                calibration=None, progress: bool | None = None, adapters=None) -> dict:
        """coremltools' quantizers take no calibration data, so `calibration` is not used. `adapters`
        (`edgeq.adapter_set.KeptAdapter`s) each get a prefill/decode function pair over the shared base weights."""
        precision = self.spec.normalize(precision)
        if adapters:
            from .coreml_adapters import check_names

            check_names(adapters)
        context = min(source.config.get("max_position_embeddings", MAX_CONTEXT), MAX_CONTEXT)
        spec = DecoderSpec.from_source(source, context)
        shapes = {n: tuple(s) for n, s in source.shapes().items()}
        stored = dataclasses.replace(spec, tied=True) if head_is_embedding(source) else spec
        plan = precision_plan(stored, shapes, precision, overrides)
        work = stage / ".coreml-work"
        work.mkdir()
        op_names = convert_functions(spec, source, work, progress, adapters or ())
        compressed = any(p != "fp16" for p in plan.values())
        names = [function for function, _, _ in functions(adapters or ())]
        with bar(len(names) + 2, "Core ML compress + merge", "step", progress) as pbar:
            for function in names:
                fp16, target = work / f"{function}-fp16.mlpackage", work / f"{function}.mlpackage"
                if compressed:
                    _step(f"compress the {function} function", compress, fp16, target, plan, op_names[function])
                    shutil.rmtree(fp16)
                    gc.collect()
                else:
                    fp16.rename(target)
                pbar.update(1)
            _step("merge the functions into one package", merge, work, stage / MODEL_FILE, names)
            shutil.rmtree(work)
            pbar.update(1)
            report = describe(stage / MODEL_FILE, {n: shapes[n] for n in build_names(stored, shapes)}, plan)
            pbar.update(1)
        warn_mismatches(log, report["mismatches"])
        report["coreml"].update({"context": context, "prefill_tokens": PREFILL_TOKENS, "deployment_target": "iOS18 / macOS15",
                                 "decoder": spec.to_dict()})
        if adapters:
            from .coreml_adapters import records

            report["adapters"] = records(stage, MODEL_FILE, adapters)
        return {"model_file": MODEL_FILE, "precision": precision, **report}


def head_is_embedding(source: SourceModel) -> bool:
    """A head untied for a kept adapter holds the embedding's values (unless a merged adapter changes either), and
    coremltools stores identical constants once: the package then holds the two as the embedding's one constant."""
    merged = source.adapter and {"lm_head.weight", "model.embed_tokens.weight"} & {*source.adapter.pairs, *source.adapter.replaced}
    return source.untied_head and not merged


def build_names(spec: DecoderSpec, shapes: dict) -> list[str]:
    """HF names of the tensors the decoder (and so the package) uses."""
    return [n for n in shapes if not n.endswith("rotary_emb.inv_freq") and not (spec.tied and n == "lm_head.weight")]
