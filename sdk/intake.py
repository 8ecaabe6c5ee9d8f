"""Model intake: a local HF folder (plus an optional LoRA adapter) checked and streamed tensor by tensor.

Peak memory follows the largest tensor, not the model: weights are memory-mapped from safetensors
and the adapter delta is added to one weight at a time. What the folder holds is checked on open (config
schema, safetensors headers, weights against the config, tokenizer files) and each tensor for NaN/inf
as it streams, so a damaged checkpoint fails in one line before any conversion work.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

from .adapter import LoraAdapter, check_against_base, merge_weight, read_adapter
from .architectures import ARCHITECTURES, Architecture, check_options, check_tensors, for_config, text_config, text_tensor_name
from .checkpoint import check_config, check_finite, check_weights
from .errors import EdgeqError
from .hashing import checkpoint_digest
from .model_shape import ModelShape
from .safetensors_index import TensorInfo, index_folder, load_pickle_tensors
from .tokenizer import ChatTokenizer, TokenizerSpec, load_tokenizer, read_chat_template, spec_from_hf_folder
from .validate import read_json_object

log = logging.getLogger(__name__)
# HF architecture class → edgeq family; each family's facts are one entry of `edgeq.architectures.ARCHITECTURES`.


def _read_json(path: Path, what: str) -> dict:
    return read_json_object(path, f"fix or re-save the {what}")


@dataclass
class SourceModel:
    path: Path
    config: dict
    family: str
    index: dict[str, TensorInfo]
    adapter: LoraAdapter | None = None
    trust_pickle: bool = False
    untied_head: bool = False  # lm_head written on its own although the checkpoint ties it to the embedding
    _finite: set = field(default_factory=set, repr=False)  # tensors already checked for NaN/inf
    stored: dict[str, str] = field(default_factory=dict, repr=False)  # edgeq's name → the file's, where they differ
    dropped: str | None = None  # what of a multimodal checkpoint is not exported (recorded in the manifest)
    origin: dict = field(default_factory=dict)  # "hub": its hub id and revision; "gguf_file": the GGUF it was dequantized from

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.family]

    @property
    def name(self) -> str:
        """What the user calls it (a default bundle is named after it): the GGUF file's stem, the hub repo's name, the folder's."""
        if gguf := self.origin.get("gguf_file"):
            return Path(gguf["file"]).stem
        return self.origin["hub"]["hub_id"].rsplit("/", 1)[-1] if "hub" in self.origin else self.path.name

    @property
    def inputs(self) -> tuple[Path, ...]:
        """The files and folders the model is read from (an export's output may be none of them, nor hold one)."""
        gguf = (self.origin.get("gguf_file") or {}).get("file")
        return tuple(Path(p) for p in (self.path, self.adapter.path if self.adapter else None, gguf) if p)

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
        if self.untied_head:
            shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
        return shapes

    def untie_head(self) -> None:
        """Makes lm_head a tensor of its own (a copy of the embedding): a LoRA on the head of a tied model adapts the
        head alone, which a tied file cannot hold (llama.cpp would apply it to the embedding lookup too)."""
        if self.config.get("tie_word_embeddings") and "lm_head.weight" not in self.base_shapes():
            self.config = {**self.config, "tie_word_embeddings": False}
            self.untied_head = True

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the merged model: an adapter's modules_to_save may resize embeddings."""
        shapes = self.base_shapes()
        if self.adapter:
            shapes.update({name: self.adapter.index[key].shape for name, key in self.adapter.replaced.items()})
        return shapes

    def _load(self, info: TensorInfo, name: str):
        from safetensors import safe_open

        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(self.stored.get(name, name))

    def dtypes(self) -> dict[str, str]:
        """Stored type of each base tensor, in safetensors' names (pickled float tensors count as F32)."""
        types = {name: info.dtype for name, info in self.index.items()}
        types.update({name: "F32" if t.is_floating_point() else str(t.dtype) for name, t in self._pickled.items()})
        return types

    def tensor(self, name: str):
        """One tensor of the (merged) model, as a torch tensor; merged weights come back as float32."""
        if self.adapter and name in self.adapter.replaced:
            key = self.adapter.replaced[name]
            weight = self._load(self.adapter.index[key], key)
        else:
            weight = self.base_tensor(name)
            if self.adapter and name in self.adapter.pairs:
                weight = merge_weight(self.adapter, name, weight, self._load)
        if name not in self._finite:
            check_finite(name, weight, self.adapter.path if self.adapter and name in self.adapter.replaced else self.path)
            self._finite.add(name)
        return weight

    def base_tensor(self, name: str):
        """A tensor of the checkpoint itself, before any adapter."""
        if self.untied_head and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        return self._pickled[name] if name in self._pickled else self._load(self.index[name], name)

    def tensors(self) -> Iterator[tuple[str, object]]:
        for name in self.shapes():
            yield name, self.tensor(name)

    @cached_property
    def vocab_size(self) -> int:
        return self.shapes()["model.embed_tokens.weight"][0]

    def fingerprint(self) -> dict:
        """Hashes of the weight files (and adapter), recorded in the manifest and keying the sensitivity cache."""
        weights, adapter = self._digests.result()
        info = {"path": str(self.path), "architecture": self.architecture, "sha256": weights}
        if self.dropped:
            info["dropped"] = self.dropped
        info.update(self.origin)
        if self.adapter:
            info["adapter"] = {"path": str(self.adapter.path), "sha256": adapter,
                               **({"hub": self.adapter.origin} if self.adapter.origin else {})}
        return info

    def hash_in_background(self) -> None:
        """Starts hashing the weight files on a thread of their own (hashlib lets go of the GIL), so the seconds a
        multi-GB checkpoint takes overlap the export's own work instead of adding to it."""
        self._digests

    def __getstate__(self) -> dict:
        """A child process (the GGUF float writer) gets the model without the hashing thread's future."""
        return {k: v for k, v in self.__dict__.items() if k != "_digests"}

    @cached_property
    def _digests(self) -> Future:
        files = sorted({info.file for info in self.index.values()})
        adapter_files = sorted({i.file for i in self.adapter.index.values()}) if self.adapter else []
        pool = ThreadPoolExecutor(1, thread_name_prefix="edgeq-hash")
        future = pool.submit(lambda: (checkpoint_digest(files), checkpoint_digest(adapter_files) if adapter_files else None))
        pool.shutdown(wait=False)
        return future

    def tokenizer_spec(self) -> TokenizerSpec:
        folder = self.tokenizer_folder
        tok = load_tokenizer(folder / "tokenizer.json")
        spec = spec_from_hf_folder(folder, tok.get_vocab(with_added_tokens=True), self.generation_config)
        bos_id = tok.token_to_id(spec.bos_token) if spec.bos_token else None
        spec.add_bos_token = bos_id is not None and tok.encode("a").ids[:1] == [bos_id]
        return spec

    def chat_tokenizer(self) -> ChatTokenizer:
        return ChatTokenizer(self.tokenizer_folder / "tokenizer.json", self.tokenizer_spec(), self.chat_template())

    def chat_template(self) -> str | None:
        return read_chat_template(self.tokenizer_folder) or read_chat_template(self.path)


def open_model(path: str | Path, adapter: str | Path | None = None, trust_pickle: bool = False, revision: str | None = None,
               progress: bool | None = None) -> SourceModel:
    """Checks a model (and adapter) and returns a streaming view of the merged model. The model is an HF folder, a
    hub id (`org/name`, at `revision`; `org/name:Q4_K_M` for a GGUF repo) or a GGUF file (dequantized first)."""
    path, origin = locate_model(path, revision, progress)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EdgeqError(f"{path} has no config.json; pass the folder of a Hugging Face checkpoint (the one with config.json and *.safetensors)")
    config = _read_json(config_path, "model config")
    archs = config.get("architectures")
    names = archs if isinstance(archs, list) and all(isinstance(a, str) for a in archs) else []
    arch = for_config(config) if names else None  # a readable but unsupported architecture says so before any schema detail
    if arch is not None:
        config = text_config(arch, config, lambda: _full_text_config(path, arch))
    check_config(config, config_path)
    check_options(arch, config)
    ModelShape.from_config(config)  # RoPE scaling, windows and per-layer RoPE: refused by name here, before any work
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise EdgeqError(f"{path} is a {method} checkpoint; export from the full-precision base model (merge the adapter into that)")
    if not (path / "tokenizer.json").is_file():
        raise EdgeqError(f"{path} has no tokenizer.json (a fast tokenizer); save the tokenizer with transformers first")
    model = SourceModel(path, config, arch.family, index_folder(path, trust_pickle), trust_pickle=trust_pickle, origin=origin)
    if arch.text_config:
        _keep_text_model(model)
    check_weights(config, model.base_shapes(), model.dtypes(), path, arch)
    check_tensors(arch, model.base_shapes())
    if adapter is not None:
        model.adapter = read_adapter(adapter, progress)
        if "lm_head.weight" in {*model.adapter.pairs, *model.adapter.replaced}:
            model.untie_head()
        resized = check_against_base(model.adapter, model.base_shapes())
        if resized:
            if not (model.adapter.path / "tokenizer.json").is_file():
                raise EdgeqError(f"the adapter resizes {', '.join(resized)} but ships no tokenizer.json; save the fine-tune's tokenizer into {adapter}")
            model.config = {**config, "vocab_size": next(iter(resized.values()))[0]}
    model.chat_tokenizer()  # a damaged tokenizer file or template fails here, before any work
    return model


def locate_model(name: str | Path, revision: str | None = None, progress: bool | None = None) -> tuple[Path, dict]:
    """The HF folder to read for `name` and where it came from: a local folder as is, a hub id from the hub cache,
    a GGUF file (local or from a hub repo) dequantized into a float folder."""
    from .gguf_source import float_folder, is_gguf, quantized
    from .hub import resolve

    found = resolve(name, revision=revision, progress=progress)
    origin = {"hub": found.origin()} if found.hub_id else {}
    if is_gguf(found.path):
        folder, facts = float_folder(found.path, progress)
        origin["gguf_file"] = {k: v for k, v in facts.items() if k not in ("chat_template", "output_tensor")}
        if quantized(facts):
            log.warning("%s is %s: its dequantized weights are the source, so requantizing compounds the error, and the "
                        "quality measured is against this GGUF, not the model it was quantized from", found.path.name, facts["precision"])
        return folder, origin
    if found.path.is_file():
        raise EdgeqError(f"{found.path} is a file but not a GGUF; pass a Hugging Face checkpoint folder, a .gguf file or a hub id (org/name)")
    if not found.path.is_dir():
        raise EdgeqError(f"model {found.path} does not exist; pass a Hugging Face checkpoint folder, a .gguf file or a hub id (org/name)")
    return found.path, origin


def _full_text_config(path: Path, arch: Architecture) -> dict:
    """The text model's config with transformers' defaults: a saved multimodal config omits the fields left at them."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), arch.text_config).to_dict()


def _keep_text_model(model: SourceModel) -> None:
    """A multimodal checkpoint seen as its text model: tensors under edgeq's names, the rest dropped and noted."""
    index, dropped = {}, []
    for name, info in model.index.items():
        own = text_tensor_name(model.arch, name)
        if own is None:
            dropped.append(name)
            continue
        index[own] = info
        if own != name:
            model.stored[own] = name
    model.index = index
    if dropped:
        parts = sorted({".".join(n.split(".")[:2] if n.startswith("model.") else n.split(".")[:1]) for n in dropped})
        model.dropped = f"exported the text model only; dropped {len(dropped)} tensors of {', '.join(parts)} (images are not supported)"


def open_base(source, base, trust_pickle: bool = False):
    """The model before fine-tuning: `base` given, else the model under the adapter; refused when it is not
    the same architecture and vocabulary (retention compares token by token)."""
    if base is None and source.adapter is None:
        return None
    base_source = open_model(base if base is not None else source.path, trust_pickle=trust_pickle)
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if base_source.config.get(key) != source.config.get(key) and not (key == "vocab_size" and source.adapter):
            raise EdgeqError(f"--base {base_source.path} has {key} {base_source.config.get(key)!r} but the model has "
                             f"{source.config.get(key)!r}; pass the model this one was fine-tuned from")
    if base_source.vocab_size != source.vocab_size:
        raise EdgeqError(f"--base {base_source.path} has a vocabulary of {base_source.vocab_size} tokens, the model {source.vocab_size}; "
                         "retention compares token by token, so the base must share the vocabulary")
    return base_source
