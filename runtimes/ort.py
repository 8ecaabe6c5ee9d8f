"""onnxruntime engine for edgeq's ONNX decoder: one InferenceSession, KV cache grown in place.

Each layer's past and present are bound (IO binding) to the same preallocated buffer sized for the
whole context, so GroupQueryAttention appends the new keys/values where they belong and nothing
crosses into Python between steps but the new token ids and the last logits, which land in a
bound numpy array. Long prompts are fed in chunks of `n_batch` tokens to bound attention memory.

A bundle's LoRA adapters (onnxruntime adapter files) are read once when the engine opens; switching binds
the adapter's A/B values to the graph's LoRA inputs (onnxruntime applies `RunOptions` adapters only to plain
runs, not to IO-bound ones), and zero values of rank 1 for the base alone.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from edgeq.engine import AdapterSwitch, default_threads
from edgeq.errors import EdgeqError

log = logging.getLogger(__name__)
_ORT_ERRORS = tuple(getattr(ort.capi.onnxruntime_pybind11_state, n) for n in (
    "Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph", "NotImplemented", "RuntimeException"))


def open_session(path: Path, threads: int, **config: str) -> ort.InferenceSession:
    """An onnxruntime session on CPU; its load failures become one EdgeqError line."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as exc:
        first = str(exc).splitlines()[0][:300]
        if "NOT_IMPLEMENTED" in first or "Could not find an implementation" in first:
            raise EdgeqError(f"onnxruntime {ort.__version__} cannot run {path.name}: {first}; upgrade onnxruntime or re-export") from exc
        raise EdgeqError(f"onnxruntime could not load {path} ({first}); the file is corrupt or not an edgeq ONNX model: re-export the bundle") from exc


class OrtEngine(AdapterSwitch):
    n_batch = 512

    def __init__(self, path: Path, *, threads: int | None = None, n_ctx: int | None = None, manifest: dict | None = None,
                 adapters: dict[str, Path] | None = None):
        self.threads = threads or default_threads(manifest)
        self.session = open_session(Path(path), self.threads)
        props = self.session.get_modelmeta().custom_metadata_map
        if "edgeq.num_layers" not in props:
            raise EdgeqError(f"{Path(path).name} is not an edgeq ONNX decoder (no edgeq metadata); export it with edgeq export --format onnx")
        self.n_layers = int(props["edgeq.num_layers"])
        trained = int(props["edgeq.max_positions"])
        self.n_ctx = min(n_ctx or trained, trained)
        self.n_vocab = int(self.session.get_outputs()[0].shape[-1])
        kv_shape = (1, int(props["edgeq.kv_heads"]), self.n_ctx, int(props["edgeq.head_dim"]))
        self._last = np.zeros((1, 1, self.n_vocab), dtype=np.float32)
        self._last_value = ort.OrtValue.ortvalue_from_numpy(self._last)
        self._binding = self.session.io_binding()
        self._binding.bind_ortvalue_output("logits", self._last_value)  # bound first: output 0 is always the logits
        self._cache = []  # keeps the numpy buffers alive as long as their OrtValues are bound
        for i in range(self.n_layers):
            for part in ("key", "value"):
                buffer = np.zeros(kv_shape, dtype=np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                self._binding.bind_ortvalue_input(f"past_key_values.{i}.{part}", value)
                self._binding.bind_ortvalue_output(f"present.{i}.{part}", value)
                self._cache.append((buffer, value))
        self._ones = np.ones((1, self.n_ctx), dtype=np.int64)
        self._keep_last = np.array(1, dtype=np.int64)
        self._keep_all = np.array(0, dtype=np.int64)
        self.tokens: list[int] = []
        self._open_adapters(adapters or {})

    @classmethod
    def open(cls, model_path: Path, manifest: dict, *, threads: int | None = None, n_ctx: int | None = None) -> "OrtEngine":
        adapters = {entry["name"]: Path(model_path).parent / entry["file"] for entry in manifest.get("adapters") or []}
        return cls(model_path, threads=threads, n_ctx=n_ctx, manifest=manifest, adapters=adapters)

    def _open_adapters(self, files: dict[str, Path]) -> None:
        """Each adapter's values (zero-copy views of the file onnxruntime read), and the zeros that stand for none."""
        slots = {i.name: i.shape for i in self.session.get_overridable_initializers() if i.name.endswith((".lora_A", ".lora_B"))}
        self._zeros = {name: ort.OrtValue.ortvalue_from_numpy(np.zeros([d if isinstance(d, int) else 1 for d in shape], dtype=np.float32))
                       for name, shape in slots.items()}
        self._adapters: dict[str, dict] = {}
        for name, file in files.items():
            try:
                values = ort.AdapterFormat.read_adapter(str(file)).get_parameters()
            except _ORT_ERRORS as exc:
                raise EdgeqError(f"onnxruntime could not read adapter {name!r} ({Path(file).name}); re-export the bundle") from exc
            unknown = sorted(set(values) - set(slots))
            if unknown:
                raise EdgeqError(f"adapter {name!r} sets {unknown[0]}, which this model has no LoRA input for; re-export the bundle")
            self._adapters[name] = values

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def _switch(self, name: str | None) -> None:
        """Binds adapter `name`'s values to the LoRA inputs (None: zeros, the base alone)."""
        values = self._adapters[name] if name is not None else {}
        for slot, zero in self._zeros.items():
            self._binding.bind_ortvalue_input(slot, values.get(slot, zero))

    def reset(self) -> None:
        self.tokens = []  # the buffers are overwritten in place; positions past the cached tokens are never read

    def truncate(self, n: int) -> None:
        """Keeps the first `n` positions: the attention mask then stops there and the next tokens overwrite the rest."""
        del self.tokens[n:]

    def _run(self, tokens: Sequence[int], keep_all: bool) -> None:
        n = len(tokens)
        if len(self.tokens) + n > self.n_ctx:
            raise EdgeqError(f"sequence longer than the context ({self.n_ctx} tokens); load with a larger n_ctx")
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, n)
        binding = self._binding
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", self._ones[:, : len(self.tokens) + n])
        binding.bind_cpu_input("logits_to_keep", self._keep_all if keep_all else self._keep_last)
        if keep_all:
            binding.bind_output("logits", "cpu")
        else:
            binding.bind_ortvalue_output("logits", self._last_value)
        try:
            self.session.run_with_iobinding(binding)
        except _ORT_ERRORS as exc:
            raise EdgeqError(f"onnxruntime failed on a batch of {n} tokens at position {len(self.tokens)}: {str(exc).splitlines()[0][:200]}") from exc
        self.tokens.extend(int(t) for t in tokens)

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        """Appends `tokens` to the cache; the returned logits are a view, valid until the next call."""
        tokens = list(tokens)
        for start in range(0, len(tokens), self.n_batch):
            self._run(tokens[start:start + self.n_batch], keep_all=False)
        return self._last[0, 0]

    def forward_all(self, tokens: Sequence[int]) -> np.ndarray:
        """The whole sequence of new tokens in one run (`n_batch` at a time), logits kept for every position."""
        tokens = list(tokens)
        chunks = []
        for start in range(0, len(tokens), self.n_batch):
            self._run(tokens[start:start + self.n_batch], keep_all=True)
            chunks.append(self._binding.get_outputs()[0].numpy()[0])
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        self.reset()
        out = self.forward_all(tokens)
        self.reset()
        return out

    def close(self) -> None:
        self._cache = []
        self._adapters = {}
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
