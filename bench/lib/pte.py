"""Any causal-LM `.pte` run through ExecuTorch's Python runtime, the same way for every exporter's program.

edgeq's own engine checks a program against its bundle's manifest; an anchor's `.pte` (optimum-executorch,
ExecuTorch's export_llm) has no manifest and its own signature, so benches read that signature from the program
itself: `forward(ids (1, T), positions)` where positions is either the start position (shape (1,), as edgeq and
export_llm write it) or one position per token (shape (T,), transformers' `cache_position`, as optimum-executorch
writes it); logits out for every token (1, T, V) or for the last one only (1, V). The most tokens one call takes is
the ids' upper bound in the method's metadata. Both kinds of program are timed and scored through this one class,
on the same runtime, kernels and threadpool.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

METHOD = "forward"


def runtime(threads: int):
    """ExecuTorch's runtime with the LLM custom ops (sdpa, KV-cache update) and quantized lookup kernels registered, and its
    threadpool (the one XNNPACK runs on; torch's thread setting does not reach it) at `threads`."""
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)
    if portable_lib._threadpool_get_thread_count() != threads:
        raise SystemExit(f"ExecuTorch's threadpool has {portable_lib._threadpool_get_thread_count()} threads, not {threads}")
    return Runtime.get()


@dataclass
class Signature:
    max_call: int  # most tokens one call takes
    positions: str  # "start": (1,) start position; "per-token": (T,) one position per token
    all_logits: bool  # logits for every token of the call (else the last one only)
    context: int | None  # get_max_context_len (or get_max_seq_len) when the program says it

    def describe(self) -> str:
        pos = "start position (1,)" if self.positions == "start" else "cache_position (T,)"
        out = "(1, T, vocab)" if self.all_logits else "last token's logits"
        return f"{METHOD}(ids (1, T<={self.max_call}), {pos}) -> {out}; context {self.context}"


def _constant(program, name: str):
    if name not in program.method_names:
        return None
    value = program.load_method(name).execute([])[0]
    return int(value) if not isinstance(value, torch.Tensor) else int(value.reshape(-1)[0])


def read_signature(program) -> Signature:
    meta = program.metadata(METHOD)
    if meta.num_inputs() != 2 or meta.num_outputs() < 1:
        raise SystemExit(f"{METHOD} takes {meta.num_inputs()} inputs and gives {meta.num_outputs()} outputs: not a "
                         "(ids, positions) -> logits program")
    ids, pos, out = meta.input_tensor_meta(0), meta.input_tensor_meta(1), meta.output_tensor_meta(0)
    ids_sizes, pos_sizes, out_sizes = list(ids.sizes()), list(pos.sizes()), list(out.sizes())
    if len(ids_sizes) != 2 or ids_sizes[0] != 1 or len(pos_sizes) not in (1, 2):
        raise SystemExit(f"{METHOD} inputs {ids_sizes} and {pos_sizes}: not ids (1, T) and positions")
    max_call = ids_sizes[1]
    positions = "per-token" if pos_sizes[-1] == max_call and max_call > 1 else "start"
    all_logits = len(out_sizes) == 3 and out_sizes[1] == max_call
    context = _constant(program, "get_max_context_len") or _constant(program, "get_max_seq_len")
    return Signature(max_call, positions, all_logits, context)


class ProgramEngine:
    """`score`, `forward`, `reset` over one `.pte` (the surface the benches' Reference and timers use)."""

    def __init__(self, rt, path: Path):
        self.path = Path(path)
        self.program = rt.load_program(self.path)
        self.signature = read_signature(self.program)
        self.method = self.program.load_method(METHOD)
        self.position = 0

    def reset(self) -> None:
        self.position = 0  # a static cache: the next call overwrites from here and attention reads only up to it

    def _call(self, tokens: list[int]) -> np.ndarray:
        ids = torch.tensor([tokens], dtype=torch.long)
        if self.signature.positions == "start":
            pos = torch.tensor([self.position], dtype=torch.long)
        else:
            pos = torch.arange(self.position, self.position + len(tokens), dtype=torch.long)
        logits = self.method.execute([ids, pos])[0]
        self.position += len(tokens)
        return logits.reshape(-1, logits.shape[-1]).numpy()

    def feed(self, tokens) -> list[np.ndarray]:
        """Appends `tokens` in the largest calls the program takes (one at a time if it returns only the last logits)."""
        tokens = [int(t) for t in tokens]
        step = self.signature.max_call if self.signature.all_logits else 1
        return [self._call(tokens[i:i + step]) for i in range(0, len(tokens), step)]

    def forward(self, tokens) -> np.ndarray:
        return self.feed(tokens)[-1][-1]

    def score(self, tokens) -> np.ndarray:
        self.reset()
        out = np.concatenate(self.feed(tokens))
        self.reset()
        return out

    def close(self) -> None:
        pass  # kept loaded: the same program is timed after it is scored
