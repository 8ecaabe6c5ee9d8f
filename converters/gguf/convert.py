"""HF checkpoint → GGUF: our own streaming writer on gguf-py, then llama.cpp's quantizer, then GPTQ.

The float file is written one tensor at a time (header first, from shapes alone), so peak memory
follows the largest tensor. Quantized types go through `llama_model_quantize`, the same code
llama-quantize runs, with per-tensor overrides and an importance matrix; with GPTQ rounding, the
linear weights' blocks are then rewritten in the types llama.cpp chose (`rounding`).
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import gguf
import numpy as np

from edgeq.errors import EdgeqError
from edgeq.fresh_process import call_in_fresh_process
from edgeq.formats import warn_mismatches
from edgeq.model_shape import ModelShape
from edgeq.intake import SourceModel
from edgeq.progress import bar

from .layout import graph, rope_rows, tensor_plan
from .spec import GGUF
from .quantize import FLOAT_TYPES, quantize, read_tensor_types
from .vocab import general_name, write_vocab
from edgeq.quant.effort import BY_GPTQ

log = logging.getLogger(__name__)
MODEL_FILE = "model.gguf"


def write_hparams(writer: gguf.GGUFWriter, config: dict, n_vocab: int, file_type: gguf.LlamaFileType) -> None:
    """Hyperparameters under llama.cpp's keys; what its graph for this architecture cannot compute was refused
    before any work (`GGUFFormat.check_source`), so every option written here is one llama.cpp reads."""
    shape = ModelShape.from_config(config)
    writer.add_context_length(shape.max_positions)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_key_length(shape.head_dim)
    writer.add_value_length(shape.head_dim)
    writer.add_rope_dimension_count(shape.rotary_dim)
    writer.add_rope_freq_base(shape.rope.theta)
    rope = shape.rope
    if rope.kind in ("linear", "yarn"):  # llama.cpp computes these from the factor itself
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if rope.kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope.params["factor"])
        if rope.kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(int(rope.params.get("original_max_position_embeddings") or shape.max_positions // rope.params["factor"]))
    if rope.kind == "longrope":  # the factors travel as tensors; llama.cpp picks the long ones past this context
        writer.add_rope_scaling_orig_ctx_len(rope.original_context)
        writer.add_rope_scaling_attn_factors(rope.attention_factor())
    if shape.sliding:  # Gemma 3: the window, which layers have it, and their RoPE base
        writer.add_sliding_window(next(w for w in shape.windows if w is not None))
        writer.add_sliding_window_pattern([w is not None for w in shape.windows])
        writer.add_rope_freq_base_swa(next(shape.rope_at(i).theta for i, w in enumerate(shape.windows) if w is not None))
    if shape.final_softcap:
        writer.add_final_logit_softcapping(shape.final_softcap)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(file_type)


def rope_freq_factors(shape: ModelShape) -> np.ndarray | None:
    """Llama 3.x long-context RoPE as llama.cpp stores it: per-frequency divisors in `rope_freqs.weight`."""
    if shape.rope.kind != "llama3":
        return None
    base = np.array(shape.rope.base_inv_freq(shape.head_dim), dtype=np.float64)
    return (base / np.array(shape.inv_freq(), dtype=np.float64)).astype(np.float32)


def extra_tensors(shape: ModelShape) -> dict[str, np.ndarray]:
    """Tensors llama.cpp reads beside the checkpoint's: Llama 3's RoPE divisors, LongRoPE's two factor sets."""
    extra = {}
    if (factors := rope_freq_factors(shape)) is not None:
        extra["rope_freqs.weight"] = factors
    if shape.longrope:
        for kind, long in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, True), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, False)):
            extra[gguf.TENSOR_NAMES[kind] + ".weight"] = np.array(shape.rope.longrope_factors(shape.rotary_dim, long), dtype=np.float32)
    return extra


def _rows_as_written(source: SourceModel):
    """A weight's rows (numpy, any dtype) in the order the float GGUF holds them (`layout.rope_rows`)."""
    import torch

    return lambda hf_name, rows: rope_rows(source, hf_name, torch.from_numpy(rows)).numpy()


def _as_array(tensor, float_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    import torch

    if tensor.ndim <= 1 or float_type == "F32":
        return tensor.to(torch.float32).numpy(), gguf.GGMLQuantizationType.F32
    if float_type == "BF16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), gguf.GGMLQuantizationType.BF16
    return tensor.to(torch.float16).numpy(), gguf.GGMLQuantizationType.F16


def write_float_gguf(source: SourceModel, path: Path, float_type: str, progress: bool | None = None) -> None:
    """Writes the (merged) model as F32/F16/BF16 GGUF, streaming one tensor at a time."""
    import torch

    config = source.config
    n_vocab = source.vocab_size
    writer = gguf.GGUFWriter(path, graph(source).arch)
    writer.add_name(general_name(source.path.name, source.tokenizer_folder))
    write_hparams(writer, config, n_vocab, FLOAT_TYPES[float_type])
    tokenizer = source.chat_tokenizer()
    write_vocab(writer, source.tokenizer_folder, tokenizer.spec, tokenizer.chat_template, n_vocab)

    plan = tensor_plan(source)
    extra = extra_tensors(ModelShape.from_config(config))
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}[float_type]
    for _, gguf_name, shape in plan:
        nbytes = math.prod(shape) * (4 if len(shape) <= 1 else itemsize)
        dtype = np.float32 if len(shape) <= 1 or float_type == "F32" else (np.uint16 if float_type == "BF16" else np.float16)
        raw = gguf.GGMLQuantizationType.BF16 if dtype == np.uint16 else None
        writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
    for gguf_name, array in extra.items():
        writer.add_tensor_info(gguf_name, array.shape, array.dtype, array.nbytes)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with bar(total=len(plan), desc=f"write {float_type} GGUF", unit="tensor", progress=progress) as pbar, torch.no_grad():
        for hf_name, gguf_name, _ in plan:
            tensor = rope_rows(source, hf_name, source.tensor(hf_name))
            if graph(source).norm_shift and hf_name.endswith("norm.weight"):
                tensor = tensor.float() + source.arch.norm_offset  # llama.cpp's Gemma graph multiplies by the gain itself
            array, _ = _as_array(tensor, float_type)
            writer.write_tensor_data(array)
            pbar.update(1)
        for array in extra.values():
            writer.write_tensor_data(array)
    writer.close()


def write_float_gguf_apart(source: SourceModel, path: Path, float_type: str, progress: bool | None) -> None:
    """`write_float_gguf` in a fresh interpreter when this one has not loaded torch yet.

    Reading the checkpoint needs torch, whose libraries alone take over 200 MB of resident memory
    that nothing gives back; the quantizer that runs next holds the largest tensor in float32. Apart,
    the two peaks never add up, as with llama.cpp's own convert script followed by llama-quantize.
    """
    if "torch" in sys.modules:
        return write_float_gguf(source, path, float_type, progress)
    call_in_fresh_process(write_float_gguf, source, path, float_type, progress, doing=f"writing the float GGUF {path.name}",
                          disk_hint=" (the float GGUF is about 2 bytes per weight)")


class GGUFConverter:
    """`edgeq export --format gguf`: F32/F16/BF16 directly, quantized types through llama.cpp."""

    spec = GGUF

    @staticmethod
    def _importance(importance: dict | None, to_gguf: dict[str, str]) -> dict:
        gguf_importance = {to_gguf[hf]: v for hf, v in (importance or {}).items() if hf in to_gguf}
        if importance and not gguf_importance:
            raise EdgeqError("the importance matrix matches no tensor of this model; recompute it from this model")
        return gguf_importance

    def convert(self, source: SourceModel, stage: Path, *, precision: str, overrides: dict[str, str] | None = None,
                calibration=None, progress: bool | None = None, adapters=None, rounding: str | None = None) -> dict:
        """`overrides` are keyed by HF weight name, as every converter's are; the calibration's importance
        matrix (when the user gave text, or a plan measured one) weighs llama.cpp's rounding. `rounding` "gptq"
        then rounds every linear weight of a type with a grid by GPTQ on the calibration text (the built-in text
        when none was given), in that type's own blocks (`rounding`); None means "gptq" when the user gave text,
        else llama.cpp's "nearest". `adapters` (`edgeq.adapter_set.KeptAdapter`s) are each written as a GGUF
        LoRA file beside the base."""
        precision = self.spec.normalize(precision)
        written = tensor_plan(source)
        to_gguf = {hf: name for hf, name, _ in written}
        matrices = [hf for hf, _, shape in written if len(shape) == 2]
        gguf_overrides = {to_gguf[hf]: t for hf, t in self.spec.check_overrides(overrides, matrices, source.shapes()).items()}
        gptq = calibration is not None and (rounding in BY_GPTQ or (rounding is None and calibration.given))
        # under GPTQ, llama.cpp's rounding survives only in types without a grid: its importance matrix (a pass over
        # the calibration text) is measured for them alone, when the file has some
        importance = (calibration.importance(progress) if not gptq else calibration.measured_importance()) if calibration else None
        gguf_importance = self._importance(importance, to_gguf)
        out = stage / MODEL_FILE
        if precision in FLOAT_TYPES and not gguf_overrides:
            write_float_gguf(source, out, precision, progress)
            gptq = False
        else:
            source_is_bf16 = any(info.dtype == "BF16" for info in source.index.values())
            intermediate = stage / "intermediate.gguf"
            write_float_gguf_apart(source, intermediate, "BF16" if source_is_bf16 else "F16", progress)
            try:
                quantize(intermediate, out, precision, overrides=gguf_overrides, importance=gguf_importance, progress=progress)
                if gptq:
                    from .rounding import gptq_grids

                    chosen, without = gptq_grids(out, written)
                    if without and not gguf_importance and calibration.given:
                        gguf_importance = self._importance(calibration.importance(progress), to_gguf)
                        quantize(intermediate, out, precision, overrides=gguf_overrides, importance=gguf_importance, progress=progress)
            finally:
                intermediate.unlink(missing_ok=True)
        rounded = []
        if gptq:
            from .rounding import round_in_place

            rounded = round_in_place(out, chosen, calibration, _rows_as_written(source), progress, adapters, learned=rounding == "learned")
        report = read_tensor_types(out, precision, gguf_overrides)
        warn_mismatches(log, report["mismatches"])
        fields = {"model_file": MODEL_FILE, "precision": precision, **report, "gptq_tensors": len(rounded),
                  "rounding": None if precision in FLOAT_TYPES and not gguf_overrides
                  else ("learned" if rounding == "learned" else "gptq") if rounded else "importance-weighted" if gguf_importance else "nearest"}
        if adapters:
            from .adapters import write_adapter

            fields["adapters"] = [{**adapter.record(), **write_adapter(source, adapter, stage)} for adapter in adapters]
        return fields
