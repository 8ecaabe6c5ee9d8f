"""What converter and engine agree on about a written `.pte`: its method, the metadata ExecuTorch's LLM runner reads,
the kernels it needs registered, and the signature checked before a program is trusted.

ExecuTorch's LLM runner (the one its Android and iOS demo apps embed) calls `forward(tokens, input_pos)` and reads the
model's facts from constant methods of the program (`get_max_seq_len`, `get_vocab_size`, `use_kv_cache`, ...); edgeq
writes both, so a bundle's `.pte` runs under that runner as well as under edgeq's engine.
"""
from __future__ import annotations

METHOD = "forward"
INPUTS = ("tokens", "input_pos")


def runner_metadata(spec, max_chunk: int, bos: int | None, eos: list[int]) -> dict:
    """Constant methods of the program, named and typed as ExecuTorch's LLM runner reads them (its `llm_runner_helper`
    metadata keys); the chunk bound is what a single call may prefill (`enable_dynamic_shape`)."""
    meta = {
        "get_max_seq_len": max_chunk, "get_max_context_len": spec.context, "get_vocab_size": spec.vocab,
        "get_n_layers": spec.layers, "use_kv_cache": True, "use_sdpa_with_kv_cache": False, "enable_dynamic_shape": True,
        "get_eos_ids": list(eos),
    }
    if bos is not None:
        meta["get_bos_id"] = bos
    return meta


def load_kernels() -> None:
    """Registers the custom (sdpa, KV cache) and quantized (embedding lookup) operators with torch and with ExecuTorch's
    runtime: needed before export and before a program that uses them is loaded."""
    import executorch.kernels.quantized  # noqa: F401
    from executorch.exir.passes import _quant_patterns_and_replacements  # noqa: F401  (quantized_decomposed.* in torch)
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
