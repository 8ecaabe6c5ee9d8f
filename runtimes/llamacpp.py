"""llama.cpp engine over llama-cpp-python's low-level API: one batch, logits read in place.

A bundle's LoRA adapters kept apart from the base (GGUF LoRA files) are all loaded when the engine opens
(`llama_adapter_lora_init`, beside the one base) and switched per request with `llama_set_adapters_lora`:
switching copies no weights, and only the adapters' own tensors are added to memory.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.engine import AdapterSwitch, default_threads
from edgeq.errors import EdgeqError
from edgeq.converters.gguf.native import llama_cpp  # the binding, with llama.cpp's logs routed and its backend up

from .llamacpp_amx import extra_buffers_usable


KV_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


class LlamaCppEngine(AdapterSwitch):
    """A GGUF file in llama.cpp. `forward` returns a view of llama.cpp's logits buffer (valid until the next call)."""

    n_batch = 512

    def __init__(self, path: Path, *, threads: int | None = None, n_ctx: int | None = None, vocab_only: bool = False,
                 adapters: dict[str, Path] | None = None, kv_cache: str | None = None):
        self._model = self._ctx = self._batch = None  # close(), and so __del__, must work however far this got
        self._adapters: dict[str, object] = {}
        mparams = llama_cpp.llama_model_default_params()
        mparams.vocab_only = vocab_only
        mparams.use_extra_bufts = vocab_only or extra_buffers_usable(Path(path))
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise EdgeqError(f"llama.cpp could not load {path}; the file is not a valid GGUF for this llama.cpp (re-export it)")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        if vocab_only:
            return
        trained = llama_cpp.llama_model_n_ctx_train(self._model)
        self.n_ctx = min(n_ctx or trained, trained)
        threads = threads or default_threads()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_threads = cparams.n_threads_batch = threads
        if kv_cache not in (None, "f16"):  # the bundle's planned cache type; llama.cpp quantizes V only under flash attention
            cparams.type_k = cparams.type_v = KV_CACHE_TYPES[kv_cache]
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.kv_cache = kv_cache or "f16"
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise EdgeqError(f"llama.cpp could not create a context of {self.n_ctx} tokens; lower n_ctx")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.threads = threads
        self.tokens: list[int] = []
        for name, file in (adapters or {}).items():
            adapter = llama_cpp.llama_adapter_lora_init(self._model, str(file).encode())
            if not adapter:
                raise EdgeqError(f"llama.cpp could not load adapter {name!r} ({Path(file).name}); it does not fit this base (re-export the bundle)")
            self._adapters[name] = adapter

    @classmethod
    def open(cls, model_path: Path, manifest: dict, *, threads: int | None = None, n_ctx: int | None = None) -> "LlamaCppEngine":
        adapters = {entry["name"]: Path(model_path).parent / entry["file"] for entry in manifest.get("adapters") or []}
        kv_cache = (manifest.get("kv_cache") or {}).get("type")
        if kv_cache is not None and kv_cache not in KV_CACHE_TYPES:
            raise EdgeqError(f"the manifest asks for KV cache type {kv_cache!r}, which llama.cpp does not store; "
                             f"choose one of {', '.join(KV_CACHE_TYPES)} (re-export the bundle)")
        return cls(model_path, threads=threads, n_ctx=n_ctx, adapters=adapters, kv_cache=kv_cache)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def _switch(self, name: str | None) -> None:
        """Runs the next tokens with adapter `name` on the base (None: the base alone)."""
        if name is None:
            llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            chosen = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            llama_cpp.llama_set_adapters_lora(self._ctx, chosen, 1, (ctypes.c_float * 1)(1.0))

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)
        self.tokens = []

    def truncate(self, n: int) -> None:
        """Drops the cached positions from `n` on (llama_memory_seq_rm); a memory that cannot cut (a recurrent
        model's) is cleared instead."""
        if n >= len(self.tokens):
            return
        if llama_cpp.llama_memory_seq_rm(self._memory, 0, n, -1):
            del self.tokens[n:]
        else:
            self.reset()

    def _decode(self, tokens: Sequence[int], all_logits: bool) -> None:
        batch = self._batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last = len(chunk) - 1
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = len(self.tokens) + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or i == last
            batch.n_tokens = len(chunk)
            if len(self.tokens) + len(chunk) > self.n_ctx:
                raise EdgeqError(f"sequence longer than the context ({self.n_ctx} tokens); load with a larger n_ctx")
            status = llama_cpp.llama_decode(self._ctx, batch)
            if status != 0:
                raise EdgeqError(f"llama.cpp decode failed (status {status})")
            self.tokens.extend(int(t) for t in chunk)
            if all_logits:
                yield np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(len(chunk), self.n_vocab))

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        for _ in self._decode(tokens, all_logits=False):
            pass
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))

    def forward_all(self, tokens: Sequence[int]) -> np.ndarray:
        """One llama_decode with logits for every position (a batch longer than `n_batch` takes several)."""
        tokens = list(tokens)
        if len(tokens) <= self.n_batch:
            return next(self._decode(tokens, all_logits=True))
        return np.concatenate([chunk.copy() for chunk in self._decode(tokens, all_logits=True)])

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        self.reset()
        out = np.concatenate([chunk.copy() for chunk in self._decode(list(tokens), all_logits=True)])
        self.reset()
        return out

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's own tokenizer: used to prove the GGUF vocab tokenizes like the HF tokenizer."""
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, len(buf), add_special, parse_special)
        if n < 0:
            raise EdgeqError("llama.cpp tokenization overflowed")
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        """llama.cpp's own detokenizer: the text llama.cpp's tools show for these ids."""
        ids = (llama_cpp.llama_token * len(tokens))(*tokens)
        size = 16 * len(tokens)
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(self._vocab, ids, len(tokens), buf, size, False, True)
            if n >= 0:
                return buf.raw[:n].decode(errors="replace")
            size = -n

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        for adapter in self._adapters.values():
            llama_cpp.llama_adapter_lora_free(adapter)
        self._adapters = {}
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()
