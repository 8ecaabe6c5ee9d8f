"""The torch reference: the original HF model (adapter merged) through transformers, float32 (`edgeq.float_model`).

With adapters kept apart (`edgeq.load(folder, adapters={name: dir})`, or a kept-adapter bundle run with
`backend="torch"`), the base is wrapped by PEFT as is, every adapter loaded beside it, and switched with PEFT's
`set_adapter` (the base alone under `disable_adapter`): PEFT's own forward is the reference for switching.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edgeq.engine import AdapterSwitch
from edgeq.errors import EdgeqError
from edgeq.float_model import load_float_model
from edgeq.intake import SourceModel, open_model


class TorchEngine(AdapterSwitch):
    def __init__(self, source: SourceModel, *, threads: int | None = None, n_ctx: int | None = None,
                 adapters: dict[str, Path] | None = None):
        from transformers import DynamicCache

        if threads:
            torch.set_num_threads(threads)
        self.source = source
        self.model = load_float_model(source)
        self.adapters: tuple[str, ...] = tuple(adapters or {})
        if adapters:
            self.model = _with_peft(self.model, adapters)
        trained = source.config.get("max_position_embeddings", 2048)
        self.n_ctx = min(n_ctx or trained, trained)
        self.n_vocab = source.config["vocab_size"]
        self._cache_type = DynamicCache
        self.reset()

    @classmethod
    def open(cls, model_path: Path, manifest: dict, *, threads: int | None = None, n_ctx: int | None = None) -> "TorchEngine":
        adapter = ((manifest.get("source") or {}).get("adapter") or {}).get("path")
        kept = {entry["name"]: Path(entry["path"]) for entry in manifest.get("adapters") or []}
        return cls(open_model(model_path, adapter=adapter, trust_pickle=manifest.get("trust_pickle", False)), threads=threads, n_ctx=n_ctx,
                   adapters=kept)

    def _switch(self, name: str | None) -> None:
        """PEFT's adapter `name` runs next (None: `_active` disables the adapters)."""
        if name is not None:
            self.model.set_adapter(name)

    def _active(self):
        """The base alone under PEFT's `disable_adapter` when no adapter is chosen."""
        return self.model.disable_adapter() if self.adapters and self.adapter is None else nullcontext()

    def reset(self) -> None:
        self._cache = self._cache_type()
        self.tokens: list[int] = []

    def truncate(self, n: int) -> None:
        if n <= 0:
            self.reset()
        elif n < len(self.tokens):
            self._cache.crop(n - len(self.tokens))  # a negative count removes that many (transformers 4 and 5 alike)
            del self.tokens[n:]

    @torch.inference_mode()
    def _append(self, tokens: Sequence[int], keep: int) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        ids = torch.tensor([tokens], dtype=torch.long)
        with self._active():
            out = self.model(input_ids=ids, past_key_values=self._cache, use_cache=True, logits_to_keep=keep)
        self.tokens.extend(tokens)
        return out.logits[0].float().numpy()

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        return self._append(tokens, 1)[-1]

    def forward_all(self, tokens: Sequence[int]) -> np.ndarray:
        return self._append(tokens, 0)

    @torch.inference_mode()
    def score(self, tokens: Sequence[int]) -> np.ndarray:
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        with self._active():
            return self.model(input_ids=ids, use_cache=False).logits[0].float().numpy()

    def close(self) -> None:
        self.model = None


def _with_peft(model, adapters: dict[str, Path]):
    """The model under PEFT with every adapter loaded by name (PEFT reads DoRA, rsLoRA, modules_to_save itself)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise EdgeqError("adapters kept apart run in torch through peft: pip install 'edgeq[peft]'") from None
    (first, path), *rest = adapters.items()
    try:
        model = PeftModel.from_pretrained(model, str(path), adapter_name=first)
        for name, path in rest:
            model.load_adapter(str(path), adapter_name=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise EdgeqError(f"peft could not load adapter {path} ({str(exc).splitlines()[0][:200]}); pass the adapters of this base") from exc
    return model.eval()
