"""HF checkpoint → GGUF: our own streaming writer on gguf-py, then llama.cpp's quantizer, then GPTQ.

The float file is written one tensor at a time (header first, from shapes alone), so peak memory
follows the largest tensor. Quantized types go through `llama_model_quantize`, the same code
llama-quantize runs, with per-tensor overrides and an importance matrix; with GPTQ rounding, the
linear weights' blocks are then rewritten in the types llama.cpp chose (`rounding`).
"""
from __future__ import annotations

import logging
import math
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgeq.architectures import ARCHITECTURES
from edgeq.errors import EdgeqError
from edgeq.formats import warn_mismatches
from edgeq.model_shape import ModelShape
from edgeq.intake import SourceModel
from edgeq.progress import bar

from .spec import GGUF
from .quantize import FLOAT_TYPES, quantize, read_tensor_types
from .vocab import general_name, write_vocab

log = logging.getLogger(__name__)
MODEL_FILE = "model.gguf"


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    # llama.cpp's LLAMA graph rotates adjacent pairs (GPT-J style); HF Llama rotates the two halves
    # of each head, so q/k rows are reordered. Qwen graphs use the halves layout as HF does.
    interleave_rope: bool


_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
FAMILIES = {a.family: Family(_ARCH_BY_NAME[a.gguf_arch], a.gguf_interleave_rope) for a in ARCHITECTURES.values()}


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


def _interleave_rope_rows(weight, n_heads: int):
    """Reorders each head's rows from halves layout (i, i+d/2) to adjacent pairs (2i, 2i+1)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _rows_as_written(source: SourceModel):
    """Puts a weight's rows (of any dtype) in the order `write_float_gguf` writes them: q/k interleaved for Llama."""
    import torch

    family, config = FAMILIES[source.family], source.config
    heads = {"q_proj.weight": config["num_attention_heads"],
             "k_proj.weight": config.get("num_key_value_heads") or config["num_attention_heads"]}

    def arrange(hf_name: str, rows: np.ndarray) -> np.ndarray:
        n_head = next((n for suffix, n in heads.items() if hf_name.endswith(suffix)), None)
        if not family.interleave_rope or n_head is None:
            return rows
        return _interleave_rope_rows(torch.from_numpy(rows), n_head).numpy()
    return arrange


def tensor_plan(source: SourceModel) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, GGUF name, shape) of every tensor to write, in file order."""
    config = source.config
    family = FAMILIES[source.family]
    names = gguf.get_tensor_name_map(family.arch, config["num_hidden_layers"])
    plan = []
    for hf_name, shape in source.shapes().items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise EdgeqError(f"tensor {hf_name} has no GGUF name for {source.architecture}; the checkpoint has layers edgeq does not know")
        plan.append((hf_name, gguf_name, tuple(shape)))
    return plan


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

    config, family = source.config, FAMILIES[source.family]
    n_vocab = source.vocab_size
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[family.arch])
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
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    with bar(total=len(plan), desc=f"write {float_type} GGUF", unit="tensor", progress=progress) as pbar, torch.no_grad():
        for hf_name, gguf_name, _ in plan:
            tensor = source.tensor(hf_name)
            if family.interleave_rope and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = _interleave_rope_rows(tensor, n_head)
            elif family.interleave_rope and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = _interleave_rope_rows(tensor, n_kv)
            if source.arch.gguf_norm_shift and hf_name.endswith("norm.weight"):
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
    (A plain subprocess, not multiprocessing: spawn would re-run a caller's script without a main guard.)
    """
    if "torch" in sys.modules:
        return write_float_gguf(source, path, float_type, progress)
    job = path.with_suffix(".job")  # in the stage: the job, then the child's error message if it fails
    job.write_bytes(pickle.dumps((source, path, float_type, progress)))
    try:
        status = subprocess.run([sys.executable, "-c", _WRITE_JOB, str(job)]).returncode  # its progress bar shows
        if status == 3:
            raise EdgeqError(job.read_text())
        if status != 0:
            raise EdgeqError(f"the process writing the float GGUF failed (exit {status}; out of memory?); free memory and export again")
    finally:
        job.unlink(missing_ok=True)


_WRITE_JOB = """
import errno, pickle, sys
from edgeq.errors import EdgeqError
from edgeq.formats import warn_mismatches
from edgeq.converters.gguf.convert import write_float_gguf
with open(sys.argv[1], "rb") as f:
    job = pickle.load(f)
try:
    write_float_gguf(*job)
except Exception as exc:  # the parent prints one line, never this process's traceback
    if isinstance(exc, EdgeqError):
        message = str(exc)
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        message = f"the disk is full while writing {job[1]}; free space (the float GGUF is about 2 bytes per weight) and export again"
    else:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        message = f"writing the float GGUF failed ({type(exc).__name__}: {detail}); rerun with --debug and report it"
    with open(sys.argv[1], "w") as f:
        f.write(message)
    sys.exit(3)
"""


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
        gptq = calibration is not None and (rounding == "gptq" or (rounding is None and calibration.given))
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

            rounded = round_in_place(out, chosen, calibration, _rows_as_written(source), progress, adapters)
        report = read_tensor_types(out, precision, gguf_overrides)
        warn_mismatches(log, report["mismatches"])
        fields = {"model_file": MODEL_FILE, "precision": precision, **report, "gptq_tensors": len(rounded),
                  "rounding": None if precision in FLOAT_TYPES and not gguf_overrides
                  else "gptq" if rounded else "importance-weighted" if gguf_importance else "nearest"}
        if adapters:
            from .adapters import write_adapter

            fields["adapters"] = [{**adapter.record(), **write_adapter(source, adapter, stage)} for adapter in adapters]
        return fields
