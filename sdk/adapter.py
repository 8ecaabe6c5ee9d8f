"""PEFT LoRA adapters: read, check against the base, and merge one weight at a time.

A LoRA (rsLoRA, per-module rank and alpha patterns) merges as W + scaling·B·A; a DoRA adapter also rescales each
merged row to its trained magnitude, m · (W + ΔW) / ‖W + ΔW‖, which is why it can only be merged: no engine's
adapter format applies a per-row renormalisation at run time. The copies of embedding weights PEFT saves
beside an embedding LoRA (`base_layer.weight`) are ignored unless they resize the table.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from .checkpoint import FLOAT_DTYPES
from .errors import EdgeqError
from .safetensors_index import TensorInfo, index_folder
from .validate import first_error, read_json_object

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                       r"(?:\.default)?(?:\.weight)?$")
_BASE_COPY = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")
_QUANTIZED_NAME = re.compile(r"bnb|4bit|8bit|gptq|awq|int4|int8|nf4", re.IGNORECASE)
_SAVED_KEY = re.compile(r"^(?P<module>.+?)(?:\.modules_to_save\.default)?\.(?P<param>weight|bias)$")


Scale = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class AdapterConfig(BaseModel):
    """The adapter_config.json fields the merge reads: a null or zero rank would divide by zero in `scaling`."""

    model_config = ConfigDict(extra="allow", strict=True, defer_build=True)
    peft_type: str = "LORA"
    r: PositiveInt
    lora_alpha: Scale | None = None
    use_rslora: bool | None = None
    use_dora: bool | None = None
    fan_in_fan_out: bool | None = None
    rank_pattern: dict[str, PositiveInt] | None = None
    alpha_pattern: dict[str, Scale] | None = None
    base_model_name_or_path: str | None = None


def _pattern_value(module: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name or its dotted suffix."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


@dataclass
class LoraAdapter:
    path: Path
    config: dict
    index: dict[str, TensorInfo]
    pairs: dict[str, dict[str, str]] = field(default_factory=dict)   # base weight name → {"A": key, "B": key}
    replaced: dict[str, str] = field(default_factory=dict)           # base tensor name → adapter key (modules_to_save)
    base_copies: dict[str, str] = field(default_factory=dict)        # base tensor name → PEFT's saved copy of it
    origin: dict | None = None                                       # hub id and revision, when named by one

    @property
    def dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def base_model(self) -> str:
        return self.config.get("base_model_name_or_path") or "unknown"

    def rank(self, weight_name: str) -> int:
        """The rank adapter_config.json gives this weight (r, or its rank_pattern entry)."""
        return _pattern_value(weight_name.removesuffix(".weight"), self.config.get("rank_pattern") or {}, self.config["r"])

    def scaling(self, weight_name: str) -> float:
        module = weight_name.removesuffix(".weight")
        rank = self.rank(weight_name)
        alpha = _pattern_value(module, self.config.get("alpha_pattern") or {}, self.config.get("lora_alpha", rank))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank


def read_adapter(path: Path, progress: bool | None = None) -> LoraAdapter:
    """A PEFT adapter folder, or a hub id (`org/lora`) resolved into the hub cache as models are."""
    from .hub import resolve

    found = resolve(path, what="adapter", progress=progress)
    path = found.path
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise EdgeqError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    config = read_json_object(config_path, "re-save the adapter with peft (save_pretrained)")
    if config.get("peft_type", "LORA") != "LORA":
        raise EdgeqError(f"adapter {path} is {config.get('peft_type')}; edgeq merges LoRA adapters only")
    try:
        AdapterConfig.model_validate(config)
    except ValidationError as exc:
        where, message = first_error(exc)
        raise EdgeqError(f"{config_path}: {where}: {message}; fix it or re-save the adapter with peft") from None
    for table in ("rank_pattern", "alpha_pattern"):
        for key in config.get(table) or {}:
            try:
                re.compile(key)
            except re.error as exc:
                raise EdgeqError(f"{config_path}: {table} key {key!r} is not a valid pattern ({exc}); fix it") from None
    if config.get("fan_in_fan_out"):
        raise EdgeqError(f"adapter {path} uses fan_in_fan_out (Conv1D layers), which the supported architectures do not have")
    try:
        index = index_folder(path)
    except EdgeqError as exc:
        raise EdgeqError(f"adapter: {exc}") from exc
    adapter = LoraAdapter(path, config, index, origin=found.origin())
    for key, info in index.items():
        if info.dtype not in FLOAT_DTYPES:
            raise EdgeqError(f"adapter tensor {key} is stored as {info.dtype}, not floating point; export from the "
                             "full-precision adapter (not a quantized one)")
        name = key.removeprefix(_PREFIX)
        if m := _LORA_KEY.match(name):
            part = "M" if m["part"] == "lora_magnitude_vector" else "A" if m["part"].endswith("A") else "B"
            adapter.pairs.setdefault(m["module"] + ".weight", {})[part] = key
        elif m := _BASE_COPY.match(name):
            adapter.base_copies[m["module"] + ".weight"] = key
        elif m := _SAVED_KEY.match(name):
            adapter.replaced[f"{m['module']}.{m['param']}"] = key
        else:
            raise EdgeqError(f"adapter {path} has a tensor edgeq does not understand: {key}")
    broken = [w for w, p in adapter.pairs.items() if not {"A", "B"} <= set(p)]
    if broken:
        raise EdgeqError(f"adapter {path} lacks lora_A or lora_B for {broken[0]}; the adapter file is incomplete")
    if adapter.dora:
        missing = [w for w, p in adapter.pairs.items() if "M" not in p]
        if missing:
            raise EdgeqError(f"adapter {path} is DoRA (use_dora) but has no lora_magnitude_vector for {missing[0]}; the adapter file is incomplete")
        embedded = [w for w, p in adapter.pairs.items() if "lora_embedding" in p["A"]]
        if embedded:
            raise EdgeqError(f"adapter {path} puts DoRA on the embedding {embedded[0]}, which edgeq does not merge; "
                             "merge it with peft's merge_and_unload() and export the merged folder")
    elif any("M" in p for p in adapter.pairs.values()):
        raise EdgeqError(f"adapter {path} has DoRA magnitudes but use_dora is not set in adapter_config.json; fix the config")
    return adapter


def check_against_base(adapter: LoraAdapter, base_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Refuses an adapter made for another base; returns the shapes that change (resized embeddings)."""
    hint = f"the adapter was trained on {adapter.base_model!r}; pass that base model"
    if _QUANTIZED_NAME.search(adapter.base_model):  # QLoRA: trained over a quantized copy of a float model
        hint += " in full precision (the float checkpoint it was quantized from, not the quantized one)"
    for weight, keys in adapter.pairs.items():
        if weight not in base_shapes:
            raise EdgeqError(f"adapter targets {weight}, which the base model does not have; {hint}")
        a, b = adapter.index[keys["A"]].shape, adapter.index[keys["B"]].shape
        if len(a) != 2 or len(b) != 2 or len(base_shapes[weight]) != 2:
            raise EdgeqError(f"adapter shapes for {weight} ({a}, {b}) are not the matrices a LoRA of {base_shapes[weight]} has; {hint}")
        rows, cols = base_shapes[weight]
        embedding = "lora_embedding" in keys["A"]
        expected_a, expected_b = ((a[0], rows), (cols, a[0])) if embedding else ((a[0], cols), (rows, a[0]))
        if a != expected_a or b != expected_b:
            raise EdgeqError(f"adapter shapes for {weight} ({a}, {b}) do not fit the base weight {base_shapes[weight]}; {hint}")
        if a[0] != adapter.rank(weight):  # the scaling divides by the configured rank: a mismatch would merge wrongly
            raise EdgeqError(f"adapter's rank for {weight} is {a[0]}, but its adapter_config.json says {adapter.rank(weight)} "
                             "(r / rank_pattern); re-save the adapter with peft")
        if "M" in keys and adapter.index[keys["M"]].shape != (rows,):
            raise EdgeqError(f"adapter's DoRA magnitude for {weight} has shape {adapter.index[keys['M']].shape}, the base weight "
                             f"{base_shapes[weight]} needs ({rows},); {hint}")
    for name, key in adapter.base_copies.items():  # PEFT's copy of an embedding it adapted: only a resize matters
        if name in base_shapes and adapter.index[key].shape != base_shapes[name] and name not in adapter.replaced:
            adapter.replaced[name] = key
    resized = {}
    for name, key in adapter.replaced.items():
        shape = adapter.index[key].shape
        if name not in base_shapes:
            raise EdgeqError(f"adapter replaces {name}, which the base model does not have; {hint}")
        if shape != base_shapes[name]:
            if shape[1:] != base_shapes[name][1:]:
                raise EdgeqError(f"adapter's {name} has shape {shape}, the base's is {base_shapes[name]}; {hint}")
            resized[name] = shape
    return resized


def lora_factors(adapter: LoraAdapter, weight: str, load):
    """(B', A') in float32 with scaling · B'·A' the weight's delta in the base weight's own (rows, cols) layout:
    PEFT's (B, A) for a linear layer, (Aᵀ, Bᵀ) for an embedding (PEFT stores those transposed)."""
    keys = adapter.pairs[weight]
    a = load(adapter.index[keys["A"]], keys["A"]).float()
    b = load(adapter.index[keys["B"]], keys["B"]).float()
    return (a.T, b.T) if "lora_embedding" in keys["A"] else (b, a)


def lora_delta(adapter: LoraAdapter, weight: str, load):
    """scaling · B·A for one weight, in float32, in the base weight's layout."""
    b, a = lora_factors(adapter, weight, load)
    return (b @ a) * adapter.scaling(weight)


def merge_weight(adapter: LoraAdapter, name: str, weight, load):
    """The base weight with the adapter merged, float32: W + ΔW, and for DoRA rescaled row by row to the trained
    magnitude (PEFT's merge: m / ‖W + ΔW‖ over each output row)."""
    merged = weight.float() + lora_delta(adapter, name, load)
    if adapter.dora:
        key = adapter.pairs[name]["M"]
        magnitude = load(adapter.index[key], key).float()
        merged = merged * (magnitude / merged.norm(dim=1)).unsqueeze(1)
    return merged
