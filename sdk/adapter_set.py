"""LoRA adapters kept apart from the base (`--keep-adapters`): named, checked together against one base, described
for the manifest, and handed to the converters as float factors.

One bundle holds one base and N adapters in the engine's own adapter form (GGUF LoRA files, onnxruntime adapter
files), so an app ships the base once and switches fine-tunes per request. What an engine's adapter cannot
express is refused here, by adapter name, before any work: a DoRA adapter (its per-row renormalisation is not a
low-rank addition), and an adapter that replaces whole tensors (`modules_to_save`, resized embeddings) — both
export fine merged. A LoRA on the head of a model that ties it to the embedding makes the base's head a tensor
of its own, so the adapter changes the head and not the embedding lookup.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .adapter import LoraAdapter, check_against_base, lora_factors, read_adapter
from .checkpoint import check_finite
from .errors import EdgeqError
from .hashing import sha256_files
from .manifest import ADAPTER_NAME

log = logging.getLogger(__name__)


@dataclass
class KeptAdapter:
    name: str
    lora: LoraAdapter

    @property
    def path(self) -> Path:
        return self.lora.path

    def targets(self) -> list[str]:
        """The HF weight names this adapter changes, in checkpoint order."""
        return sorted(self.lora.pairs)

    def factors(self, weight: str) -> tuple[object, object, float]:
        """(B, A, scaling) in float32, with scaling · B·A the delta of `weight` in its (rows, cols) layout."""
        b, a = lora_factors(self.lora, weight, _load)
        for part, tensor in (("lora_B", b), ("lora_A", a)):
            check_finite(f"{weight} {part}", tensor, self.path)
        return b, a, self.lora.scaling(weight)

    def rank(self, weight: str) -> int:
        return self.lora.index[self.lora.pairs[weight]["A"]].shape[0]

    def record(self) -> dict:
        """What the manifest says about the adapter (the converter adds its file)."""
        targets = self.targets()
        config = self.lora.config
        files = sorted({info.file for info in self.lora.index.values()} | {self.path / "adapter_config.json"})
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": sha256_files(files),
            "base_model": self.lora.base_model,
            "rank": config["r"],
            "ranks": sorted({self.rank(w) for w in targets}),
            "alpha": config.get("lora_alpha", config["r"]),
            "rslora": bool(config.get("use_rslora")),
            "scaling": sorted({round(self.lora.scaling(w), 6) for w in targets}),
            "targets": sorted({w.removesuffix(".weight").rsplit(".", 1)[-1] for w in targets}),
            "tensors": len(targets),
        }


def _load(info, key: str):
    from safetensors import safe_open

    with safe_open(str(info.file), framework="pt") as f:
        return f.get_tensor(key)


def parse_adapters(adapters) -> list[tuple[str, Path]]:
    """`{"name": dir}`, (name, dir) pairs, or "NAME=DIR" / "DIR" strings (a bare folder is named after itself), as
    (name, folder) pairs with valid, distinct names."""
    if isinstance(adapters, dict):
        pairs = [(str(name), Path(folder)) for name, folder in adapters.items()]
    else:
        pairs = []
        for item in adapters:
            if isinstance(item, tuple):
                pairs.append((str(item[0]), Path(item[1])))
                continue
            text = str(item)
            name, sep, folder = text.partition("=")
            if not sep or Path(text).is_dir():
                name, folder = Path(text).name, text
            pairs.append((name, Path(folder)))
    seen = set()
    for name, _ in pairs:
        if not re.match(ADAPTER_NAME, name):
            raise EdgeqError(f"adapter name {name!r} is not usable: use 1-64 letters, digits, '_', '-' or '.', starting "
                             "with a letter or digit (NAME=DIR)")
        if name in seen:
            raise EdgeqError(f"two adapters are named {name!r}; give each its own name (NAME=DIR)")
        seen.add(name)
    if not pairs:
        raise EdgeqError("no adapters given; pass NAME=DIR for each adapter to keep")
    return pairs


def _same_base(adapters: list[KeptAdapter]) -> None:
    """Adapters that name different base models do not belong in one bundle (local paths and hub ids of one model
    compare by their last part)."""
    named = [(a, a.lora.base_model.rstrip("/").rsplit("/", 1)[-1].lower()) for a in adapters if a.lora.base_model != "unknown"]
    for adapter, base in named[1:]:
        first, first_base = named[0]
        if base != first_base:
            raise EdgeqError(f"adapter {adapter.name!r} was trained on {adapter.lora.base_model!r}, adapter {first.name!r} on "
                             f"{first.lora.base_model!r}: one bundle holds adapters of one base; export them in separate bundles")


def refusal(adapter: KeptAdapter, fmt: str) -> str | None:
    """Why `fmt`'s adapter files cannot hold this adapter apart from the base (None: they can)."""
    merged = f"export it merged instead (--adapter {adapter.path} without --keep-adapters)"
    if adapter.lora.dora:
        return (f"adapter {adapter.name!r} is DoRA: its magnitude vector renormalises every adapted row, which a {fmt} adapter "
                f"(a low-rank addition) cannot express; {merged}")
    if adapter.lora.replaced:
        name = next(iter(adapter.lora.replaced))
        return (f"adapter {adapter.name!r} replaces {name} whole (modules_to_save or a resized vocabulary), and a {fmt} adapter "
                f"only adds low-rank deltas to the base's tensors; {merged}")
    return None


def open_adapters(source, adapters, fmt: str | None) -> list[KeptAdapter]:
    """Reads and checks every adapter against the base `source` (an `edgeq.intake.SourceModel` without an adapter)
    for format `fmt`, whose files must hold it apart (unties the base's head when an adapter needs it); `fmt` None
    is PEFT in torch, which runs every adapter as it is. Fails in one line naming the adapter."""
    kept = []
    for name, folder in parse_adapters(adapters):
        try:
            lora = read_adapter(folder)
            if "lm_head.weight" in {*lora.pairs, *lora.replaced} and fmt is not None:
                source.untie_head()
            shapes = source.base_shapes()
            shapes.setdefault("lm_head.weight", shapes["model.embed_tokens.weight"])  # a tied head: PEFT adapts it alone
            check_against_base(lora, shapes)
        except EdgeqError as exc:
            raise EdgeqError(f"adapter {name!r}: {exc}") from None
        kept.append(KeptAdapter(name, lora))
    _same_base(kept)
    for adapter in kept:
        if fmt is not None and (why := refusal(adapter, fmt)) is not None:
            raise EdgeqError(why)
    if source.untied_head:
        heads = [a.name for a in kept if "lm_head.weight" in a.lora.pairs]
        log.warning("the base ties lm_head to the embedding, and adapter %s adapts lm_head: the head is written as a tensor of "
                    "its own so the adapter changes the head alone", ", ".join(repr(h) for h in heads))
    return kept
