"""HF checkpoint → GGUF: our own streaming writer on gguf-py, then llama.cpp's quantizer.

The float file is written one tensor at a time (header first, from shapes alone), so peak memory
follows the largest tensor. Quantized types go through `llama_model_quantize`, the same code
llama-quantize runs, with per-tensor overrides and an importance matrix.
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

from edgeq.errors import EdgeqError
from edgeq.intake import SourceModel
from edgeq.progress import bar

from .gguf_quantize import FLOAT_TYPES, QUANT_TYPES, quantize, read_tensor_types
from .gguf_vocab import write_vocab

log = logging.getLogger(__name__)
MODEL_FILE = "model.gguf"


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH
    # llama.cpp's LLAMA graph rotates adjacent pairs (GPT-J style); HF Llama rotates the two halves
    # of each head, so q/k rows are reordered. Qwen graphs use the halves layout as HF does.
    interleave_rope: bool


FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": Family(gguf.MODEL_ARCH.QWEN3, False),
}


def _rope(config: dict) -> tuple[float, dict]:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta") or params.get("rope_theta") or 10000.0
    return float(theta), params


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def write_hparams(writer: gguf.GGUFWriter, config: dict, n_vocab: int, file_type: gguf.LlamaFileType) -> None:
    n_head = config["num_attention_heads"]
    head_dim = _head_dim(config)
    theta, _ = _rope(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(file_type)


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3.x long-context RoPE, stored as `rope_freqs.weight`."""
    theta, params = _rope(config)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise EdgeqError(f"RoPE scaling {kind!r} is not supported by edgeq's GGUF writer yet; supported: none, llama3")
    dim = _head_dim(config)
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    factor, low, high = params["factor"], params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params["original_max_position_embeddings"]
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)
    return divisors.astype(np.float32)


def _interleave_rope_rows(weight, n_heads: int):
    """Reorders each head's rows from halves layout (i, i+d/2) to adjacent pairs (2i, 2i+1)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


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
    writer.add_name(source.path.name)
    write_hparams(writer, config, n_vocab, FLOAT_TYPES[float_type])
    tokenizer = source.chat_tokenizer()
    write_vocab(writer, source.tokenizer_folder, tokenizer.spec, tokenizer.chat_template, n_vocab)

    plan = tensor_plan(source)
    rope_factors = llama3_rope_factors(config)
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}[float_type]
    for _, gguf_name, shape in plan:
        nbytes = math.prod(shape) * (4 if len(shape) <= 1 else itemsize)
        dtype = np.float32 if len(shape) <= 1 or float_type == "F32" else (np.uint16 if float_type == "BF16" else np.float16)
        raw = gguf.GGMLQuantizationType.BF16 if dtype == np.uint16 else None
        writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
    if rope_factors is not None:
        writer.add_tensor_info("rope_freqs.weight", rope_factors.shape, rope_factors.dtype, rope_factors.nbytes)

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
            array, _ = _as_array(tensor, float_type)
            writer.write_tensor_data(array)
            pbar.update(1)
        if rope_factors is not None:
            writer.write_tensor_data(rope_factors)
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
import pickle, sys
from edgeq.errors import EdgeqError
from edgeq.converters.gguf import write_float_gguf
with open(sys.argv[1], "rb") as f:
    job = pickle.load(f)
try:
    write_float_gguf(*job)
except EdgeqError as exc:
    with open(sys.argv[1], "w") as f:
        f.write(str(exc))
    sys.exit(3)
"""


class GGUFConverter:
    """`edgeq export --format gguf`: F32/F16/BF16 directly, quantized types through llama.cpp."""

    name = "gguf"
    runtime = "llamacpp"
    default_precision = "Q4_K_M"
    planned_precision = "Q4_0"  # file type of a planned export; the plan overrides every tensor
    precisions = tuple(FLOAT_TYPES) + tuple(QUANT_TYPES)

    def convert(self, source: SourceModel, stage: Path, *, precision: str, overrides: dict[str, str] | None = None,
                importance: dict[str, np.ndarray] | None = None, progress: bool | None = None) -> dict:
        """`overrides` and `importance` are keyed by HF weight name, as every converter's are."""
        precision = precision.upper()
        if precision not in self.precisions:
            raise EdgeqError(f"GGUF precision {precision!r} is not supported; choose one of {', '.join(self.precisions)}")
        to_gguf = {hf: name for hf, name, _ in tensor_plan(source)}
        gguf_overrides = {to_gguf[hf]: t.upper() for hf, t in (overrides or {}).items() if hf in to_gguf}
        if overrides and len(gguf_overrides) != len(overrides):
            unknown = sorted(set(overrides) - set(to_gguf))
            raise EdgeqError(f"precision overrides name tensors the model does not have: {', '.join(unknown[:3])}")
        gguf_importance = {to_gguf[hf]: v for hf, v in (importance or {}).items() if hf in to_gguf}
        if importance and not gguf_importance:
            raise EdgeqError("the importance matrix matches no tensor of this model; recompute it from this model")
        out = stage / MODEL_FILE
        if precision in FLOAT_TYPES and not gguf_overrides:
            write_float_gguf(source, out, precision, progress)
        else:
            source_is_bf16 = any(info.dtype == "BF16" for info in source.index.values())
            intermediate = stage / "intermediate.gguf"
            write_float_gguf_apart(source, intermediate, "BF16" if source_is_bf16 else "F16", progress)
            try:
                quantize(intermediate, out, precision, overrides=gguf_overrides, importance=gguf_importance, progress=progress)
            finally:
                intermediate.unlink(missing_ok=True)
        report = read_tensor_types(out, precision, gguf_overrides)
        if problems := report["mismatches"]:
            first = problems[0]
            log.warning("%d tensors are not the type asked (e.g. %s: asked %s, got %s, %s); see `edgeq inspect`",
                        len(problems), first["tensor"], first["asked"], first["got"], first["why"])
        return {"model_file": MODEL_FILE, "precision": precision, **report}
