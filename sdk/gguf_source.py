"""A GGUF file as the model to export: dequantized once into a float32 Hugging Face folder, cached by its hash.

Many people hold only a GGUF (LM Studio, Ollama, a hub repo of GGUFs). Every format and the planner read
a float source, tensor by tensor; rather than a second intake path through every converter, the GGUF is
turned into the folder they already read. transformers' `gguf_file=` does the dequantization (its loader
calls gguf-py's reference `dequantize`, the file format's own definition, and undoes llama.cpp's q/k row
order), and the result is kept in float32: a 4-bit block's scale times its codes needs more mantissa than
float16 has, and the point is that the float folder computes exactly what the GGUF does.

The template and stop ids come from the file's own metadata (`tokenizer.chat_template`, its eos / eot /
eom ids), and what the file says about itself (its precision, base model, license) is kept beside the
folder (`edgeq_gguf.json`) for the manifest and the model card. The export's quality is then measured
against this dequantized GGUF, not the model it was once quantized from: requantizing compounds the error,
which the warning on open says with the file's own precision.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgeqError

log = logging.getLogger(__name__)
FACTS_FILE = "edgeq_gguf.json"
_FLOAT_TYPES = {"F32", "F16", "BF16", "ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"}
_STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def read_facts(path: Path) -> dict:
    """What the file says about itself: architecture, precision (its file type and each tensor type's share of the
    weights), template, stop ids, and where it came from (base model, license), for the manifest and the card."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # a truncated or foreign file: gguf-py fails with whatever it tripped on
        raise EdgeqError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {str(exc)[:120]}); pass a complete .gguf") from None
    weights: dict[str, int] = {}
    for tensor in reader.tensors:
        kind = GGMLQuantizationType(tensor.tensor_type).name
        weights[kind] = weights.get(kind, 0) + int(np.prod(tensor.shape))
    total = sum(weights.values()) or 1
    file_type = _field(reader, "general.file_type")
    try:
        precision = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        precision = None
    precision = precision or max(weights, key=weights.get)
    base = [_base_model(reader, i) for i in range(_field(reader, "general.base_model.count") or 0)]
    return {
        "architecture": _field(reader, "general.architecture"),
        "precision": precision,
        "types": {k: round(v / total, 4) for k, v in sorted(weights.items(), key=lambda kv: -kv[1])},
        "name": _field(reader, "general.name"),
        "base_model": [b for b in base if b],
        "license": _field(reader, "general.license"),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "stop_ids": sorted({int(v) for key in _STOP_KEYS if (v := _field(reader, key)) is not None}),
        "output_tensor": any(t.name == "output.weight" for t in reader.tensors),
    }


def _base_model(reader, i: int) -> str | None:
    """A hub id from general.base_model.N.*: its repo URL on huggingface.co, else organization/name."""
    url = _field(reader, f"general.base_model.{i}.repo_url") or ""
    if "huggingface.co/" in url:
        return url.split("huggingface.co/", 1)[1].strip("/")
    org, name = _field(reader, f"general.base_model.{i}.organization"), _field(reader, f"general.base_model.{i}.name")
    return f"{org}/{name}".replace(" ", "-") if org and name else name


def quantized(facts: dict) -> bool:
    return facts["precision"].upper() not in _FLOAT_TYPES


def check_architecture(path: Path, facts: dict) -> None:
    """Refuses, by name and before any work, what transformers cannot dequantize or edgeq cannot export."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from .architectures import ARCHITECTURES

    arch = facts["architecture"]
    ours = {a.family for a in ARCHITECTURES.values() if a.text_config is None}  # a family's name is llama.cpp's (tested)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise EdgeqError(f"{path} is a GGUF of architecture {arch!r}, which transformers cannot dequantize "
                         f"(it reads {', '.join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) & ours))} that edgeq exports); "
                         "export from the model's Hugging Face checkpoint instead")
    if arch not in ours:
        raise EdgeqError(f"{path} is a GGUF of architecture {arch!r}, which edgeq does not export "
                         f"(it exports {', '.join(sorted(ours))}); pass a supported model")


def float_folder(path: Path, progress: bool | None = None) -> tuple[Path, dict]:
    """The float32 HF folder of a GGUF file (built once, cached under $EDGEQ_CACHE/dequantized by the file's hash) and its facts."""
    from .default_model import cache_dir
    from .hashing import checkpoint_digest

    path = Path(path)
    facts = read_facts(path)
    check_architecture(path, facts)
    digest = checkpoint_digest([path])
    target = cache_dir() / "dequantized" / f"{path.stem[:64]}-{digest[:16]}"
    if not (target / FACTS_FILE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            log.info("dequantizing %s into %s (once; float32)", path, target)
            _build(path, tmp, facts, progress)
            (tmp / FACTS_FILE).write_text(json.dumps({**facts, "sha256": digest}, indent=2) + "\n")
            for item in (tmp, *tmp.iterdir()):
                item.chmod(0o755 if item.is_dir() else 0o644)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / FACTS_FILE).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process built it first
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, (EdgeqError, KeyboardInterrupt)) or not isinstance(exc, Exception):
                raise
            raise EdgeqError(f"dequantizing {path} failed ({type(exc).__name__}: {str(exc)[:160]}); check free disk space "
                             f"under {target.parent}, or export from the model's Hugging Face checkpoint") from exc
    facts = json.loads((target / FACTS_FILE).read_text())
    return target, {**facts, "file": str(path)}


@contextmanager
def _bars_like_edgeqs(progress: bool | None):
    """transformers' GGUF loader draws a bar of its own with a plain tqdm (deaf to TQDM_DISABLE, which tqdm reads at
    import): for this step, which is edgeq's, it follows edgeq's rule instead (on a terminal, or when asked)."""
    import transformers.modeling_gguf_pytorch_utils as loader
    from tqdm.auto import tqdm

    plain = loader.tqdm
    loader.tqdm = functools.partial(tqdm, disable=None if progress is None else not progress, leave=False)
    try:
        yield
    finally:
        loader.tqdm = plain


def _build(gguf: Path, out: Path, facts: dict, progress: bool | None) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _bars_like_edgeqs(progress):
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **{dtype_kw: torch.float32})
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.tie_word_embeddings = not facts["output_tensor"]  # llama.cpp writes no output.weight for a tied head
    model = type(src)(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise EdgeqError(f"{gguf}: transformers' dequantized model does not fit its own config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); export from the Hugging Face checkpoint")
    eos = facts["stop_ids"] or ([tok.eos_token_id] if tok.eos_token_id is not None else [])
    model.generation_config = transformers.GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos,
                                                            pad_token_id=tok.pad_token_id)
    model.eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if facts["chat_template"]:  # the file's own template, byte for byte, whatever transformers carried over
        (out / "chat_template.jinja").write_text(facts["chat_template"], encoding="utf-8")
    config_file = out / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    if not (out / "tokenizer.json").is_file():
        raise EdgeqError(f"{gguf}: transformers built no fast tokenizer from the file's vocabulary; "
                         "export from the model's Hugging Face checkpoint")
