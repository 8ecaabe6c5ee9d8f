"""PEFT LoRA adapters: read, check against the base, and merge one weight at a time."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgeqError
from .safetensors_index import TensorInfo, index_folder

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.default)?(?:\.weight)?$")
_SAVED_KEY = re.compile(r"^(?P<module>.+?)(?:\.modules_to_save\.default)?\.(?P<param>weight|bias)$")


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

    @property
    def base_model(self) -> str:
        return self.config.get("base_model_name_or_path") or "unknown"

    def scaling(self, weight_name: str) -> float:
        module = weight_name.removesuffix(".weight")
        rank = _pattern_value(module, self.config.get("rank_pattern") or {}, self.config["r"])
        alpha = _pattern_value(module, self.config.get("alpha_pattern") or {}, self.config.get("lora_alpha", rank))
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank


def read_adapter(path: Path) -> LoraAdapter:
    path = Path(path)
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise EdgeqError(f"{path} is not a PEFT adapter folder (no adapter_config.json)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise EdgeqError(f"adapter {path} is {config.get('peft_type')}; edgeq merges LoRA adapters only")
    if config.get("use_dora"):
        raise EdgeqError(f"adapter {path} is a DoRA adapter; merge it with peft's merge_and_unload() and export the merged folder")
    if config.get("fan_in_fan_out"):
        raise EdgeqError(f"adapter {path} uses fan_in_fan_out (Conv1D layers), which the supported architectures do not have")
    try:
        index = index_folder(path)
    except EdgeqError as exc:
        raise EdgeqError(f"adapter: {exc}") from exc
    adapter = LoraAdapter(path, config, index)
    for key in index:
        name = key.removeprefix(_PREFIX)
        if m := _LORA_KEY.match(name):
            part = "A" if m["part"].endswith("A") else "B"
            adapter.pairs.setdefault(m["module"] + ".weight", {})[part] = key
        elif m := _SAVED_KEY.match(name):
            adapter.replaced[f"{m['module']}.{m['param']}"] = key
        else:
            raise EdgeqError(f"adapter {path} has a tensor edgeq does not understand: {key}")
    broken = [w for w, p in adapter.pairs.items() if set(p) != {"A", "B"}]
    if broken:
        raise EdgeqError(f"adapter {path} lacks lora_A or lora_B for {broken[0]}; the adapter file is incomplete")
    return adapter


def check_against_base(adapter: LoraAdapter, base_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Refuses an adapter made for another base; returns the shapes that change (resized embeddings)."""
    hint = f"the adapter was trained on {adapter.base_model!r}; pass that base model"
    for weight, keys in adapter.pairs.items():
        if weight not in base_shapes:
            raise EdgeqError(f"adapter targets {weight}, which the base model does not have; {hint}")
        a, b = adapter.index[keys["A"]].shape, adapter.index[keys["B"]].shape
        rows, cols = base_shapes[weight]
        embedding = "lora_embedding" in keys["A"]
        expected_a, expected_b = ((a[0], rows), (cols, a[0])) if embedding else ((a[0], cols), (rows, a[0]))
        if a != expected_a or b != expected_b:
            raise EdgeqError(f"adapter shapes for {weight} ({a}, {b}) do not fit the base weight {base_shapes[weight]}; {hint}")
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


def lora_delta(adapter: LoraAdapter, weight: str, load):
    """scaling · B·A for one weight, in float32 (transposed for embeddings, as PEFT stores them)."""
    keys = adapter.pairs[weight]
    a = load(adapter.index[keys["A"]], keys["A"]).float()
    b = load(adapter.index[keys["B"]], keys["B"]).float()
    delta = (b @ a) * adapter.scaling(weight)
    return delta.T if "lora_embedding" in keys["A"] else delta
