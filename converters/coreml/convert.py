"""HF checkpoint → Core ML `.mlpackage` with a stateful KV cache (iOS 18 / macOS 15).

edgeq's own torch decoder (`edgeq.decoder`) is traced twice, for a prefill chunk of
`PREFILL_TOKENS` and for one decode token, and converted with the KV cache as Core ML state and
float16 compute; both are merged into one multifunction package: identical weights are stored once and the
two functions share the state, so an app prefills with `prefill` and generates with `decode`.

Weights: int8 per channel and int4 in blocks of 32 (or 16/64/128) are written by edgeq while each function is
lowered (`coreml_codes`): every function holds the same weights, so their codes are computed once and shared,
where coremltools' quantizer ran once per function on packages saved, reloaded and saved again to run it (the
largest share of a 1.5B export's time), in coremltools' layout and ops. int8 is coremltools' rounding bit for bit;
int4 is rounded to each block's least (importance-weighted) squared error, where coremltools' min/max rounding lost
to llama.cpp's Q4_0 at more bits per weight (`coreml_format.linear_codes`). 4/6-bit k-means palettes stay
coremltools' (`palettize`, on each saved function, only when the plan has any); per-weight exceptions come from the
precision plan, by op name.

Memory: the decoder is traced with float32 parameters. coremltools' torch frontend computes in
float32 until its float16 pass, so float16 parameters each got a float32 copy beside them; float32
ones it uses in place (its consts are views of the parameters). So each function is converted in two
steps: the frontend alone (`convert_to="milinternal"`), then, once the traced module and the decoder
are gone and the program's consts hold the only references to the float32 weights, the passes and
the ML program. The float16 pass is `lean_fp16_cast`: its overflow check does not index whole
weights, and it folds each weight's float16 cast into a const and drops the float32 const at once,
so each float32 weight is freed as its float16 copy is made. Each function therefore builds its own
decoder from the checkpoint (one shared decoder would hold every float32 weight through every
function's pass), and is saved before the next. The peak of a function's conversion is about 4 bytes
per parameter (the float32 decoder) plus 1 GiB, where it was 6 (float32 + float16 weights; measured
peaks: bench/README.md). The shared codes (a byte per quantized weight) wait on disk between functions
(`SharedCodes`), so they never sit beside a float32 decoder.
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
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil.passes.defs.quantization import add_fp16_cast
from coremltools.converters.mil.mil.passes.helper import block_context_manager
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass

from edgeq.decoder import DecoderSpec, build_decoder
from edgeq.errors import EdgeqError
from edgeq.formats import warn_mismatches
from edgeq.intake import SourceModel
from edgeq.progress import bar

from .codes import SharedCodes, compressor
from .spec import COREML, INT4_BLOCKS, gptq_grid
from .merge import merge_packages
from .package import describe, weight_ops
from edgeq.quant.effort import BY_GPTQ

log = logging.getLogger(__name__)
MODEL_FILE = "model.mlpackage"
PREFILL_TOKENS = 64     # one prefill call processes this many prompt tokens (the last chunk is padded)
MAX_CONTEXT = 4096      # KV cache slots in the package (capped by the model's trained context)
FUNCTIONS = (("decode", 1), ("prefill", PREFILL_TOKENS))


def precision_plan(spec: DecoderSpec, shapes: dict, precision: str, overrides: dict[str, str] | None,
                   gptq: bool = False) -> dict[str, str]:
    """HF weight name → precision for every matrix the decoder uses; checks the overrides.

    At int4 the head keeps int8, as llama.cpp's Q4 types keep their output at 6-8 bits, unless GPTQ rounds it: with a
    4-bit head rounded alone, Core ML int4 lost to llama.cpp's Q4_0 on Qwen2.5-Coder-0.5B (bench/README.md, Core ML).
    A tied head is the embedding's one constant, which GPTQ cannot round for both uses, so it is int8 either way."""
    matrices = [n for n, s in shapes.items() if len(s) == 2 and not (spec.tied and n == "lm_head.weight")]
    plan = dict.fromkeys(matrices, precision)
    head = "model.embed_tokens.weight" if spec.tied else None if gptq else "lm_head.weight"
    if precision in INT4_BLOCKS and head in plan:
        plan[head] = "int8"
    plan.update(COREML.check_overrides(overrides, matrices, shapes))
    return plan


@register_pass(namespace="edgeq", override=True)
class lean_fp16_cast(add_fp16_cast):
    """coremltools' float16 compute pass, leaner in two ways.

    Its overflow check scans each float32 weight in slices: theirs builds np.where indices of the whole weight,
    33 bytes per element with its absolute values (7.7 GB for the embedding of a 1.5B model).

    A weight's float16 cast is folded into a float16 const as soon as the last op using the weight is cast, and the
    float32 const is removed (theirs leaves every float32 const beside its float16 cast until the next
    `const_elimination` and `dead_code_elimination`, and its loop's list of ops keeps them all alive to the end). The
    folding is what `const_elimination` does next anyway (same name, same value, same place), so the program is the
    same; once nothing else holds the float32 arrays, each is freed as its float16 copy is made."""

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

    def apply(self, prog):
        """Theirs (op_selector / skip_ops_by_type), over a list of the block's ops that lets go of each op once
        visited: a transformed op, removed from the block, still holds its float32 inputs."""

        @block_context_manager
        def apply_block(block):
            self._cache_vars.append({})
            ops = list(block.operations)
            for index in range(len(ops)):
                op, ops[index] = ops[index], None
                for inner in op.blocks:
                    apply_block(inner)
                if self.is_valid_op(op) and (self.op_selector(op) if self.op_selector is not None
                                             else op.op_type not in self.skip_ops_by_type):
                    self.transform_op(op)
            self._cache_vars.pop()

        for function in prog.functions.values():
            apply_block(function)

    def transform_op(self, op) -> None:
        weights = [var for inputs in op.inputs.values() for var in (inputs if isinstance(inputs, (list, tuple)) else (inputs,))
                   if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")]
        super().transform_op(op)
        for var in weights:
            self._fold(var)

    def _fold(self, var) -> None:
        """Replaces the float16 casts of const `var` by consts (as `const_elimination` would) and removes `var`'s
        const, if casts are all that use it now."""
        const, casts = var.op, list(var.child_ops)
        if const.enclosing_block is None or not casts or any(
                cast.op_type != "cast" or cast.dtype.val != "fp16" or not cast.outputs[0].can_be_folded_to_const() for cast in casts):
            return
        block, folded = const.enclosing_block, []
        for cast in casts:
            out = cast.outputs[0]
            folded_const = mb.const(val=out.val, before_op=cast, name=out.name)
            if block.try_replace_uses_of_var_after_op(anchor_op=cast, old_var=out, new_var=folded_const):
                if self.current_cache_vars().get(out.name) is out:
                    del self.current_cache_vars()[out.name]
                out.set_name(out.name + "_ignored")
                folded.append(cast)
        if len(folded) < len(casts):
            block.remove_ops(folded)
            return
        block.remove_ops(folded + [const])
        # A removed op and its output var refer to each other: only a full gc would free that cycle, and the float32
        # value with it. Nothing in the program refers to either any more, so let go of the value now.
        for dead in (var, const.val):
            dead._sym_val = None


def fp16_pipeline():
    """coremltools' default passes with `lean_fp16_cast` in place of `add_fp16_cast`."""
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.passes = ["edgeq::lean_fp16_cast" if p == "common::add_fp16_cast" else p for p in pipeline.passes]
    return pipeline


def frontend_pipeline():
    """A main stage that runs only what the torch frontend's own stage runs (dead code and loop invariants): coremltools
    drops from the frontend stage every default pass the main stage leaves out, so an empty one would change it."""
    return ct.PassPipeline(["common::dead_code_elimination", "common::loop_invariant_elimination"], "edgeq_frontend")


def trace_function(decoder, tokens: int):
    """Traces the decoder for `tokens` inputs per call and converts it with the cache as state, as far as the MIL
    program coremltools' torch frontend makes: its float32 consts are views of the decoder's parameters."""
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
        convert_to="milinternal",
        compute_precision=ct.precision.FLOAT16,
        pass_pipeline=frontend_pipeline(),
    )


def lower_function(program, codes: SharedCodes):
    """The rest of the conversion: coremltools' passes with float16 compute (`lean_fp16_cast`), then the plan's int8 /
    int4 codes in place of their weights (`shared_codes`), then the ML program."""
    pipeline = fp16_pipeline()
    pipeline.append_pass("edgeq::shared_codes")
    pipeline.set_options("edgeq::shared_codes", {"codes": codes})
    try:
        return ct.convert(program, minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
                          compute_precision=ct.precision.FLOAT16, pass_pipeline=pipeline, skip_model_load=True)
    finally:
        PASS_REGISTRY["edgeq::shared_codes"].codes = None


def frontend(spec: DecoderSpec, source: SourceModel, tokens: int, adapter, progress):
    """(the MIL program of one function, HF names of the decoder's weights), from a decoder of its own, which dies
    here: the program's float32 consts are then the only holders of its parameters."""
    from .adapters import applied

    decoder = build_decoder(spec, source.tensor, dtype=torch.float32, cache_dtype=torch.float16, progress=progress)
    names = decoder.weight_names()
    with applied(decoder, adapter) as traced:
        return trace_function(traced, tokens), names


def palettize(path: Path, plan: dict[str, str], op_names: dict[str, str]) -> None:
    """coremltools' k-means palettes for the plan's palettized weights, by op name, in the saved function at `path`."""
    import coremltools.optimize.coreml as cto

    configs = {op_names[name]: compressor(p) for name, p in plan.items() if name in op_names}
    model = cto.palettize_weights(ct.models.MLModel(str(path), skip_model_load=True), cto.OptimizationConfig(op_name_configs=configs))
    shutil.rmtree(path)  # the palettized model lives in a package of its own
    model.save(str(path))


def functions(adapters=()) -> list[tuple[str, int, object]]:
    """(function name, tokens per call, the kept adapter it runs or None) of every function the package holds."""
    from .adapters import function_name

    return [(name, tokens, None) for name, tokens in FUNCTIONS] + [
        (function_name(name, adapter.name), tokens, adapter) for adapter in adapters for name, tokens in FUNCTIONS]


def merge(work: Path, out: Path, names: list[str]) -> None:
    merge_packages({function: work / f"{function}.mlpackage" for function in names}, out, default="decode")


def convert_functions(spec: DecoderSpec, source: SourceModel, work: Path, codes: SharedCodes, progress,
                      adapters=()) -> dict[str, dict[str, str]]:
    """Converts every function (an adapter's with its LoRA branches over the same base parameters) with the plan's
    int8 / int4 codes, saving each before the next; returns, per function, HF weight name → the op name coremltools
    gave that weight (what palettization targets). Each function gets a float32 decoder of its own (float16 cache),
    built from `source` again: one shared decoder would hold every float32 weight through each function's float16
    pass. The codes (`SharedCodes`) are computed in the first function, or given by GPTQ, and shared by the others."""
    op_names = {}
    todo = functions(adapters)
    with bar(len(todo), "Core ML convert", "function", progress) as pbar:
        for function, tokens, adapter in todo:
            program, names = _step(f"convert the {function} function", frontend, spec, source, tokens, adapter, progress)
            gc.collect()  # the traced module and the decoder: their parameters now live only as the program's consts
            model = _step(f"convert the {function} function", lower_function, program, codes)
            del program
            ops = weight_ops(model._mil_program.functions["main"], names)
            op_names[function] = {name: op.name for name, op in ops.items()}
            model.save(str(work / f"{function}.mlpackage"))
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
                calibration=None, progress: bool | None = None, rounding: str | None = None, adapters=None) -> dict:
        """`rounding` "nearest" rounds int4 blocks to their least squared error, weighted by the calibration's
        importance matrix when it has one (as ONNX's and llama.cpp's nearest rounding are); "gptq" (needs
        `calibration`) rounds every int4 linear by GPTQ on its text, the head too. None: GPTQ when the user gave
        calibration text, else nearest. int8 is coremltools' per-channel
        rounding and the palettes its k-means. `adapters` (`edgeq.adapter_set.KeptAdapter`s) each get a
        prefill/decode function pair over the shared base weights, which GPTQ rounds for every adapter's stream."""
        precision = self.spec.normalize(precision)
        rounding = rounding or ("gptq" if calibration is not None and calibration.given else "nearest")
        if rounding not in self.spec.roundings:
            raise EdgeqError(f"rounding {rounding!r} is not one of {', '.join(self.spec.roundings)}")
        if adapters:
            from .adapters import check_names

            check_names(adapters)
        context = min(source.config.get("max_position_embeddings", MAX_CONTEXT), MAX_CONTEXT)
        spec = DecoderSpec.from_source(source, context)
        shapes = {n: tuple(s) for n, s in source.shapes().items()}
        stored = dataclasses.replace(spec, tied=True) if head_is_embedding(source) else spec
        gptq = rounding in BY_GPTQ and calibration is not None
        plan = precision_plan(stored, shapes, precision, overrides, gptq=gptq)
        int4 = any(p in INT4_BLOCKS for p in plan.values())
        importance = calibration.importance(progress) if int4 and calibration is not None and not gptq else None
        work = stage / ".coreml-work"
        work.mkdir()
        codes = SharedCodes(plan, work / "codes", importance)
        if gptq and int4:
            gptq_rounding(calibration, plan, shapes, progress, adapters, codes, rounding == "learned")
        op_names = convert_functions(spec, source, work, codes, progress, adapters or ())
        names = [function for function, _, _ in functions(adapters or ())]
        palettes = {name: p for name, p in plan.items() if p.startswith("palettize")}
        with bar(len(names) * bool(palettes) + 2, "Core ML palettize + merge" if palettes else "Core ML merge", "step", progress) as pbar:
            for function in names if palettes else ():
                _step(f"palettize the {function} function", palettize, work / f"{function}.mlpackage", palettes, op_names[function])
                gc.collect()
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
            from .adapters import records

            report["adapters"] = records(stage, MODEL_FILE, adapters)
        return {"model_file": MODEL_FILE, "precision": precision, **report,
                "rounding": (rounding if gptq and codes.rounding() == "gptq" else codes.rounding()) if int4 else None}


def gptq_rounding(calibration, plan: dict[str, str], shapes: dict, progress, adapters, codes: SharedCodes, learned: bool = False) -> None:
    """GPTQ's codes of every int4 linear of the plan, on the calibration text, into `codes` (the embedding is a lookup:
    no inputs to compensate; a width the block does not divide stays float16, as `quantizable` says). The float model
    is let go after: the conversion builds float32 decoders of its own."""
    from edgeq.quant.effort import require_tokens
    from edgeq.quant.gptq import quantize_model

    grids = {name: gptq_grid(p) for name, p in plan.items()
             if p in INT4_BLOCKS and name != "model.embed_tokens.weight" and shapes[name][-1] % INT4_BLOCKS[p] == 0}
    try:
        if grids:
            require_tokens(calibration, "max" if learned else "standard")
            quantize_model(calibration.model, calibration.windows, grids, progress, variants=adapters or (), into=codes,
                           gains=calibration.gptq_gains, learned=learned)
    finally:
        calibration.release()


def head_is_embedding(source: SourceModel) -> bool:
    """A head untied for a kept adapter holds the embedding's values (unless a merged adapter changes either), and
    coremltools stores identical constants once: the package then holds the two as the embedding's one constant."""
    merged = source.adapter and {"lm_head.weight", "model.embed_tokens.weight"} & {*source.adapter.pairs, *source.adapter.replaced}
    return source.untied_head and not merged


def build_names(spec: DecoderSpec, shapes: dict) -> list[str]:
    """HF names of the tensors the decoder (and so the package) uses."""
    return [n for n in shapes if not n.endswith("rotary_emb.inv_freq") and not (spec.tied and n == "lm_head.weight")]
