"""Model intake: a local HF folder (plus an optional LoRA adapter) checked and streamed tensor by tensor.

Peak memory follows the largest tensor, not the model: weights are memory-mapped from safetensors
and the adapter delta is added to one weight at a time.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

from .adapter import LoraAdapter, check_against_base, lora_delta, read_adapter
from .errors import EdgeqError
from .safetensors_index import TensorInfo, index_folder, load_pickle_tensors
from .tokenizer import ChatTokenizer, TokenizerSpec, read_chat_template, spec_from_hf_folder

# HF architecture class → edgeq family. Each family is a table entry in the converters.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",    # Llama 2/3.x, SmolLM/SmolLM2, TinyLlama
    "Qwen2ForCausalLM": "qwen2",    # Qwen2, Qwen2.5
    "Qwen3ForCausalLM": "qwen3",    # Qwen3 dense
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EdgeqError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); fix or re-save the {what}") from exc


@dataclass
class SourceModel:
    path: Path
    config: dict
    family: str
    index: dict[str, TensorInfo]
    adapter: LoraAdapter | None = None
    trust_pickle: bool = False

    @property
    def architecture(self) -> str:
        return self.config["architectures"][0]

    @property
    def tokenizer_folder(self) -> Path:
        """The adapter's tokenizer wins when it ships one (added tokens, resized embeddings)."""
        if self.adapter and (self.adapter.path / "tokenizer.json").is_file():
            return self.adapter.path
        return self.path

    @cached_property
    def generation_config(self) -> dict:
        path = self.path / "generation_config.json"
        return _read_json(path, "generation config") if path.is_file() else {}

    @cached_property
    def _pickled(self) -> dict:
        return load_pickle_tensors(self.path) if not self.index else {}

    def base_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {name: info.shape for name, info in self.index.items()}
        shapes.update({name: tuple(t.shape) for name, t in self._pickled.items()})
        return shapes

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the merged model: an adapter's modules_to_save may resize embeddings."""
        shapes = self.base_shapes()
        if self.adapter:
            shapes.update({name: self.adapter.index[key].shape for name, key in self.adapter.replaced.items()})
        return shapes

    def _load(self, info: TensorInfo, name: str):
        from safetensors import safe_open

        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)

    def tensor(self, name: str):
        """One tensor of the (merged) model, as a torch tensor; merged weights come back as float32."""
        if self.adapter and name in self.adapter.replaced:
            key = self.adapter.replaced[name]
            return self._load(self.adapter.index[key], key)
        weight = self._pickled[name] if name in self._pickled else self._load(self.index[name], name)
        if self.adapter and name in self.adapter.pairs:
            weight = weight.float() + lora_delta(self.adapter, name, self._load)
        return weight

    def tensors(self) -> Iterator[tuple[str, object]]:
        for name in self.shapes():
            yield name, self.tensor(name)

    @cached_property
    def vocab_size(self) -> int:
        return self.shapes()["model.embed_tokens.weight"][0]

    def fingerprint(self) -> dict:
        """Hashes of the weight files (and adapter), recorded in the manifest."""
        def digest(paths):
            h = hashlib.sha256()
            for p in paths:
                with open(p, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
            return h.hexdigest()

        weights = sorted({info.file for info in self.index.values()})
        info = {"path": str(self.path), "architecture": self.architecture, "sha256": digest(weights)}
        if self.adapter:
            info["adapter"] = {"path": str(self.adapter.path), "sha256": digest(sorted({i.file for i in self.adapter.index.values()}))}
        return info

    def tokenizer_spec(self) -> TokenizerSpec:
        folder = self.tokenizer_folder
        vocab = json.loads((folder / "tokenizer.json").read_text())
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(json.dumps(vocab))
        spec = spec_from_hf_folder(folder, tok.get_vocab(with_added_tokens=True), self.generation_config)
        bos_id = tok.token_to_id(spec.bos_token) if spec.bos_token else None
        spec.add_bos_token = bos_id is not None and tok.encode("a").ids[:1] == [bos_id]
        return spec

    def chat_tokenizer(self) -> ChatTokenizer:
        return ChatTokenizer(self.tokenizer_folder / "tokenizer.json", self.tokenizer_spec(), self.chat_template())

    def chat_template(self) -> str | None:
        return read_chat_template(self.tokenizer_folder) or read_chat_template(self.path)


def open_model(path: str | Path, adapter: str | Path | None = None, trust_pickle: bool = False) -> SourceModel:
    """Checks an HF folder (and adapter) and returns a streaming view of the merged model."""
    path = Path(path)
    if not path.is_dir():
        raise EdgeqError(f"model folder {path} does not exist; pass a local Hugging Face checkpoint folder")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EdgeqError(f"{path} has no config.json; pass the folder of a Hugging Face checkpoint (the one with config.json and *.safetensors)")
    config = _read_json(config_path, "model config")
    archs = config.get("architectures") or []
    family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if family is None:
        raise EdgeqError(
            f"architecture {', '.join(archs) or config.get('model_type', 'unknown')} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise EdgeqError(f"{path} is a {method} checkpoint; export from the full-precision base model (merge the adapter into that)")
    if not (path / "tokenizer.json").is_file():
        raise EdgeqError(f"{path} has no tokenizer.json (a fast tokenizer); save the tokenizer with transformers first")
    model = SourceModel(path, config, family, index_folder(path, trust_pickle), trust_pickle=trust_pickle)
    if adapter is not None:
        model.adapter = read_adapter(Path(adapter))
        resized = check_against_base(model.adapter, model.base_shapes())
        if resized:
            if not (Path(adapter) / "tokenizer.json").is_file():
                raise EdgeqError(f"the adapter resizes {', '.join(resized)} but ships no tokenizer.json; save the fine-tune's tokenizer into {adapter}")
            model.config = {**config, "vocab_size": next(iter(resized.values()))[0]}
    return model
