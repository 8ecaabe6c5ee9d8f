"""Core ML bundles: the real runtime (macOS) and a quality check that runs anywhere.

`CoreMLEngine` runs the `.mlpackage` with Core ML: `prefill` in chunks for the prompt, `decode` one
token at a time, both on one `MLState` holding the KV cache. Core ML predicts only on Apple
platforms, so elsewhere opening it fails with one line that says what to do instead.

`CoreMLTorchEngine` (`--backend coreml-torch`) is NOT the Core ML runtime. It verifies quality:
edgeq's torch decoder with the weights read back out of the package and dequantized exactly as
stored (int8 / int4 / palettes / float16), computing in float32. It measures what compression
costs, not Core ML's float16 arithmetic or speed.

A bundle's LoRA adapters kept apart are functions of the same package (`prefill_NAME` / `decode_NAME`, sharing
the base's weights; `edgeq.converters.coreml.adapters`). `CoreMLEngine` loads every adapter's pair when it opens
and switches by running the other pair on a fresh state; `CoreMLTorchEngine` reads each adapter function's LoRA
factors back and switches them on the torch decoder's LoRA branches (None: the branches are off, and the decoder
computes exactly what it computes for a bundle without adapters).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.engine import AdapterSwitch, ChunkedLogits
from edgeq.errors import EdgeqError


def _spec_and_context(manifest: dict, n_ctx: int | None):
    from edgeq.decoder import DecoderSpec

    info = manifest.get("coreml") or {}
    if "decoder" not in info:
        raise EdgeqError("this bundle's manifest has no Core ML decoder description; re-export it with this edgeq")
    spec = DecoderSpec.from_dict(info["decoder"])
    return spec, min(n_ctx or spec.context, spec.context)


class CoreMLEngine(ChunkedLogits, AdapterSwitch):
    """The `.mlpackage` in Core ML (macOS 15+): prefill chunks, then decode, on one shared state."""

    def __init__(self, path: Path, manifest: dict, n_ctx: int | None = None):
        import coremltools as ct

        spec, self.n_ctx = _spec_and_context(manifest, n_ctx)
        self.n_vocab = spec.vocab
        self.chunk = manifest["coreml"]["prefill_tokens"]  # the prefill function's fixed input width
        # name → (prefill, decode) models: the base's, then one pair per kept adapter (functions of the same package)
        pairs = {None: {"prefill": "prefill", "decode": "decode"}}
        pairs.update({entry["name"]: entry["functions"] for entry in manifest.get("adapters") or []})
        self._functions = {}
        try:
            for name, functions in pairs.items():
                self._functions[name] = tuple(ct.models.MLModel(str(path), function_name=functions[f]) for f in ("prefill", "decode"))
        except Exception as exc:
            raise EdgeqError(f"Core ML could not load {path} ({exc}); it needs macOS 15 / iOS 18 or later") from exc
        self._prefill, self._decode = self._functions[None]
        self.reset()

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(name for name in self._functions if name is not None)

    def _switch(self, name: str | None) -> None:
        """The next tokens run through adapter `name`'s functions (None: the base's), on a fresh state."""
        self._prefill, self._decode = self._functions[name]

    @classmethod
    def open(cls, model_path: Path, manifest: dict, *, threads: int | None = None, n_ctx: int | None = None) -> "CoreMLEngine":
        if sys.platform != "darwin":
            bundle = Path(model_path).parent
            raise EdgeqError(
                f"Core ML predicts only on macOS/iOS, not {sys.platform}: run {bundle} on a Mac (or drop the .mlpackage into "
                f"an Xcode project); here, `edgeq eval {bundle}` measures its quality and `edgeq run {bundle} --backend "
                f"coreml-torch` generates with its weights in torch"
            )
        return cls(model_path, manifest, n_ctx)

    def reset(self) -> None:
        self._state = self._decode.make_state()
        self.tokens: list[int] = []

    def truncate(self, n: int) -> None:
        """Keeps the first `n` positions of the state: the package masks every slot past the current position
        and overwrites it before it is read (as a padded prefill chunk's slots are), so cutting is forgetting."""
        del self.tokens[n:]

    def _run(self, model, tokens: list[int]) -> np.ndarray:
        """One call on `len(tokens)` slots from the current position; returns their logits."""
        width = self.chunk if model is self._prefill else 1
        ids = np.zeros((1, width), dtype=np.int32)
        ids[0, :len(tokens)] = tokens
        positions = np.arange(len(self.tokens), len(self.tokens) + width, dtype=np.int32).reshape(1, -1)
        out = model.predict({"input_ids": ids, "position_ids": positions}, state=self._state)
        self.tokens.extend(int(t) for t in tokens)
        return np.asarray(out["logits"], dtype=np.float32)[0, :len(tokens)]

    def _feed(self, tokens: Sequence[int]) -> list[np.ndarray]:
        tokens = list(tokens)
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise EdgeqError(f"sequence longer than the context ({self.n_ctx} tokens); start a new conversation")
        out = []
        while tokens:
            # A padded chunk writes junk past the sequence end; those slots are masked and overwritten before use.
            fits = len(self.tokens) + self.chunk <= self.n_ctx and len(tokens) > 1
            take = min(self.chunk, len(tokens)) if fits else 1
            out.append(self._run(self._prefill if fits else self._decode, tokens[:take]))
            tokens = tokens[take:]
        return out

    def close(self) -> None:
        self._prefill = self._decode = self._state = None
        self._functions = {}


class CoreMLTorchEngine(AdapterSwitch):
    """Quality check, not the Core ML runtime: the package's dequantized weights in edgeq's torch
    decoder (float32 compute), so `edgeq eval --backend coreml-torch` works on any OS.

    Weights the package does not store (a norm gain of all ones that Core ML's converter folded
    away, a zero bias) come from the source model, rounded to float16 as the package would hold them.
    """

    def __init__(self, path: Path, manifest: dict, *, threads: int | None = None, n_ctx: int | None = None):
        import dataclasses

        import torch

        from edgeq.converters.coreml.package import read_weights
        from edgeq.decoder import Decoder, build_decoder

        if threads:
            torch.set_num_threads(threads)
        spec, self.n_ctx = _spec_and_context(manifest, n_ctx)
        self.n_vocab = spec.vocab
        spec = dataclasses.replace(spec, context=self.n_ctx)
        with torch.device("meta"):
            names = Decoder(spec).weight_names()
        stored = read_weights(path, names)
        if manifest.get("untied_head") and "lm_head.weight" not in stored:  # the head untied for an adapter: one constant
            stored["lm_head.weight"] = stored["model.embed_tokens.weight"]
        self._source = None

        def load(name):
            if name in stored:
                return torch.from_numpy(stored.pop(name))
            if not name.endswith(("norm.weight", ".bias")):
                raise EdgeqError(f"{path} does not hold weight {name}; the package is damaged, re-export the bundle")
            return self._source_model(manifest).tensor(name).to(torch.float16)

        self.decoder = build_decoder(spec, load, dtype=torch.float32)
        self.tokens: list[int] = []
        self._open_adapters(path, manifest.get("adapters") or [])

    def _open_adapters(self, path: Path, entries: list[dict]) -> None:
        """Each adapter's factors as its decode function stores them, and LoRA branches (off) on every module any adapts."""
        import torch
        from torch import nn

        from edgeq.converters.coreml.adapters import lora_modules, read_lora

        self._factors: dict[str, dict] = {}
        self._lora: dict = {}
        if not entries:
            return
        modules = [n for n, m in self.decoder.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
        read = read_lora(path, {entry["name"]: entry["functions"]["decode"] for entry in entries}, modules)
        self._factors = {name: {m: tuple(torch.from_numpy(t) for t in pair) for m, pair in factors.items()} for name, factors in read.items()}
        self._lora = lora_modules(self.decoder, sorted({m for factors in read.values() for m in factors}))

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._factors)

    def _switch(self, name: str | None) -> None:
        """The decoder's LoRA branches take adapter `name`'s factors (None: off, the base alone)."""
        from edgeq.converters.coreml.adapters import set_factors

        set_factors(self._lora, self._factors[name] if name is not None else None)

    def _source_model(self, manifest: dict):
        if self._source is None:
            from edgeq.intake import open_model

            src = manifest.get("source") or {}
            folder = Path(src.get("path", ""))
            if not (folder / "config.json").is_file():
                raise EdgeqError(f"the source model {folder} is not there; coreml-torch needs it for the few tensors the package folds away")
            self._source = open_model(folder, adapter=(src.get("adapter") or {}).get("path"), trust_pickle=manifest.get("trust_pickle", False))
        return self._source

    @classmethod
    def open(cls, model_path: Path, manifest: dict, *, threads: int | None = None, n_ctx: int | None = None) -> "CoreMLTorchEngine":
        return cls(model_path, manifest, threads=threads, n_ctx=n_ctx)

    def reset(self) -> None:
        self.decoder.reset()
        self.tokens = []

    def truncate(self, n: int) -> None:
        """Keeps the first `n` cache slots: the decoder masks every slot past the current position and overwrites it first."""
        del self.tokens[n:]

    def _run(self, tokens: Sequence[int]) -> np.ndarray:
        import torch

        tokens = list(tokens)
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise EdgeqError(f"sequence longer than the context ({self.n_ctx} tokens); load with a larger n_ctx")
        ids = torch.tensor([tokens])
        positions = torch.arange(len(self.tokens), len(self.tokens) + len(tokens)).view(1, -1)
        with torch.inference_mode():
            logits = self.decoder(ids, positions)[0]
        self.tokens.extend(int(t) for t in tokens)
        return logits.float().numpy()

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        return self._run(tokens)[-1]

    def forward_all(self, tokens: Sequence[int]) -> np.ndarray:
        return self._run(tokens)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        self.reset()
        out = self._run(tokens)
        self.reset()
        return out

    def close(self) -> None:
        self.decoder = None
        self._factors, self._lora = {}, {}
