"""ExecuTorch engine: a bundle's `.pte` through `executorch.runtime`, its XNNPACK delegate and ExecuTorch's LLM kernels.

The program's one method, `forward(tokens (1, T), input_pos (1,))`, appends T tokens to its static KV cache at
`input_pos` and returns their logits: a prompt goes in chunks of up to the program's `max_chunk` tokens, a reply a
token at a time. The cache is the program's own state; `truncate` only moves the position back, since the next call
overwrites the slots from there and the attention kernel reads only up to the current position.

Before anything is loaded, the program's method and its input/output signature are checked against the manifest
(the bundle's checksums were verified by `edgeq.load`): a `.pte` that is not the one exported is refused in one line.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.engine import ChunkedLogits, default_threads
from edgeq.errors import EdgeqError

log = logging.getLogger(__name__)


def _runtime():
    """ExecuTorch's runtime with edgeq's kernels registered, after the pins are checked (a mismatched torch fails inside
    executorch's import with an undefined symbol)."""
    from edgeq.converters.executorch.spec import check_installed

    check_installed()
    from edgeq.converters.executorch.program import load_kernels

    load_kernels()
    from executorch.runtime import Runtime

    return Runtime.get()


def _set_threadpool(threads: int) -> None:
    """Sizes ExecuTorch's threadpool, the one XNNPACK and its kernels run on: torch's thread setting does not reach it, and
    it starts at every core. It is one pool per process, so the engine loaded last sets it for all; it is reset only when
    the size differs, since a reset while another engine of the process runs would pull the pool from under it."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


class ExecuTorchEngine(ChunkedLogits):
    def __init__(self, path: Path, manifest: dict, *, threads: int | None = None, n_ctx: int | None = None):
        import torch

        from edgeq.converters.executorch.program import INPUTS, METHOD

        info = manifest.get("executorch") or {}
        if "context" not in info:
            raise EdgeqError("this bundle's manifest has no ExecuTorch description; re-export it with this edgeq")
        self.threads = threads or default_threads(manifest)
        torch.set_num_threads(self.threads)
        self._torch = torch
        runtime = _runtime()
        _set_threadpool(self.threads)
        try:
            program = runtime.load_program(Path(path))
        except Exception as exc:
            raise EdgeqError(f"ExecuTorch could not read {Path(path).name} ({str(exc)[:200]}); re-export the bundle") from exc
        if set(program.method_names) != {METHOD, *info.get("metadata", {})}:
            raise EdgeqError(f"{Path(path).name} has methods {sorted(program.method_names)}, not the {METHOD!r} and metadata "
                             "the manifest names; it is not this bundle's program: re-export the bundle")
        meta = program.metadata(METHOD)
        if meta.num_inputs() != len(INPUTS) or meta.num_outputs() != 1:
            raise EdgeqError(f"{Path(path).name}'s {METHOD} takes {meta.num_inputs()} inputs and gives {meta.num_outputs()} "
                             f"outputs, not ({', '.join(INPUTS)}) → logits; re-export the bundle")
        self._method = program.load_method(METHOD)
        self._program = program
        self.n_ctx = min(n_ctx or info["context"], info["context"])
        self.n_vocab = int(info["decoder"]["vocab"])
        self.chunk = int(info["max_chunk"])
        self.tokens: list[int] = []

    @classmethod
    def open(cls, model_path: Path, manifest: dict, *, threads: int | None = None, n_ctx: int | None = None) -> "ExecuTorchEngine":
        return cls(model_path, manifest, threads=threads, n_ctx=n_ctx)

    def reset(self) -> None:
        self.tokens = []

    def truncate(self, n: int) -> None:
        """Keeps the first `n` positions: the next tokens overwrite the slots after them before anything reads them."""
        del self.tokens[max(n, 0):]

    def _run(self, tokens: list[int]) -> np.ndarray:
        torch = self._torch
        ids = torch.tensor([tokens], dtype=torch.long)
        position = torch.tensor([len(self.tokens)], dtype=torch.long)
        try:
            logits = self._method.execute([ids, position])[0]
        except Exception as exc:
            raise EdgeqError(f"ExecuTorch failed on {len(tokens)} tokens at position {len(self.tokens)}: {str(exc)[:200]}") from exc
        self.tokens.extend(tokens)
        return logits[0].numpy()

    def _feed(self, tokens: Sequence[int]) -> list[np.ndarray]:
        tokens = [int(t) for t in tokens]
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise EdgeqError(f"sequence longer than the context ({self.n_ctx} tokens); load with a larger n_ctx or start anew")
        return [self._run(tokens[start:start + self.chunk]) for start in range(0, len(tokens), self.chunk)]

    def close(self) -> None:
        self._method = self._program = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
