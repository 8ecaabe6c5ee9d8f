"""How a checkpoint's tensors are laid out for llama.cpp: its graph per family, tensor names, row order.

The facts here are llama.cpp's, not the family's: what its graph for a family is called, what that graph
hard-codes, and how it wants q/k rows ordered. The writer, the adapter writer and the spec's source check
read them from this one module; gguf-py is imported only where names are mapped.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlamaCppGraph:
    arch: str                      # llama.cpp's architecture name (gguf-py's MODEL_ARCH_NAMES)
    interleave_rope: bool = False  # it rotates adjacent pairs (HF: the two halves of a head), so q/k rows are reordered
    sliding: bool = False          # it runs sliding-window layers (a per-layer pattern)
    nope_every: int = 0            # it skips RoPE on every n-th layer (hard-coded), not on a list
    norm_shift: bool = False       # it multiplies by the stored norm gain, so Gemma's (1 + w) is stored whole


_GEMMA3 = LlamaCppGraph("gemma3", sliding=True, norm_shift=True)

GRAPHS: dict[str, LlamaCppGraph] = {  # keyed by edgeq's family name (edgeq.architectures.ARCHITECTURES)
    "llama": LlamaCppGraph("llama", interleave_rope=True),
    "qwen2": LlamaCppGraph("qwen2"),
    "qwen3": LlamaCppGraph("qwen3"),
    "gemma3": _GEMMA3,
    "gemma3-multimodal": _GEMMA3,
    "phi3": LlamaCppGraph("phi3"),
    "smollm3": LlamaCppGraph("smollm3", interleave_rope=True, nope_every=4),
}


def graph(source) -> LlamaCppGraph:
    return GRAPHS[source.family]


def gguf_arch(source):
    """gguf-py's MODEL_ARCH of the source's family."""
    import gguf

    return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == graph(source).arch)


def _interleave_rows(weight, n_heads: int):
    """Reorders each head's rows from halves layout (i, i+d/2) to adjacent pairs (2i, 2i+1)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def rope_rows(source, hf_name: str, rows):
    """`rows` (a q/k projection's weight or bias, or the output side of a LoRA on one) in the order llama.cpp's
    graph rotates them; any other tensor, or a graph that rotates halves as HF does, unchanged."""
    if not graph(source).interleave_rope:
        return rows
    config = source.config
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return _interleave_rows(rows, config["num_attention_heads"])
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return _interleave_rows(rows, config.get("num_key_value_heads") or config["num_attention_heads"])
    return rows


def tensor_plan(source) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF name, GGUF name, shape) of every tensor to write, in file order."""
    import gguf

    from edgeq.errors import EdgeqError

    config = source.config
    names = gguf.get_tensor_name_map(gguf_arch(source), config["num_hidden_layers"])
    plan = []
    for hf_name, shape in source.shapes().items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise EdgeqError(f"tensor {hf_name} has no GGUF name for {source.architecture}; the checkpoint has layers edgeq does not know")
        plan.append((hf_name, gguf_name, tuple(shape)))
    return plan
