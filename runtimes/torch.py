"""The torch reference: the original HF model (adapter merged) through transformers, float32."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edgeq.intake import SourceModel, open_model


def load_hf_model(source: SourceModel, dtype=torch.float32):
    """The HF model with the adapter merged by edgeq's own merge (the same tensors every export sees)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # edgeq shows its own progress; a bar per load is noise
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, use_safetensors=not source.trust_pickle)
    if source.adapter:
        if source.config["vocab_size"] != model.config.vocab_size:
            model.resize_token_embeddings(source.config["vocab_size"])
        state = model.state_dict()
        with torch.no_grad():
            for name in {*source.adapter.pairs, *source.adapter.replaced}:
                state[name].copy_(source.tensor(name))
    return model.eval()


class TorchEngine:
    def __init__(self, source: SourceModel, *, threads: int | None = None, n_ctx: int | None = None):
        from transformers import DynamicCache

        if threads:
            torch.set_num_threads(threads)
        self.source = source
        self.model = load_hf_model(source)
        trained = source.config.get("max_position_embeddings", 2048)
        self.n_ctx = min(n_ctx or trained, trained)
        self.n_vocab = source.config["vocab_size"]
        self._cache_type = DynamicCache
        self.reset()

    @classmethod
    def open(cls, model_path: Path, manifest: dict, *, threads: int | None = None, n_ctx: int | None = None) -> "TorchEngine":
        adapter = (manifest.get("source") or {}).get("adapter", {}).get("path")
        return cls(open_model(model_path, adapter=adapter, trust_pickle=manifest.get("trust_pickle", False)), threads=threads, n_ctx=n_ctx)

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
    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        ids = torch.tensor([tokens], dtype=torch.long)
        out = self.model(input_ids=ids, past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        self.tokens.extend(tokens)
        return out.logits[0, -1].float().numpy()

    @torch.inference_mode()
    def score(self, tokens: Sequence[int]) -> np.ndarray:
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        return self.model(input_ids=ids, use_cache=False).logits[0].float().numpy()

    def close(self) -> None:
        self.model = None
