"""GGUF's facts for the rest of edgeq: precisions, nominal sizes, the planner's space. Imports no llama_cpp.

The precision space uses ggml's own quantizers (through `ggml_quants`, imported on first use), so the
error a plan predicts is the error llama.cpp will make.
"""
from __future__ import annotations

import json

from edgeq.errors import EdgeqError
from edgeq.formats import FormatSpec

FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q3_K_M", "Q3_K_L", "Q2_K",
               "IQ4_NL", "IQ4_XS")


class GGUFSpace:
    """Types every llama.cpp CPU backend runs well. K-quants only where rows are a multiple of 256."""

    format = "gguf"
    float_bytes = 4
    tied_head_types = ()  # a tied checkpoint's head is the table
    types = ("Q4_0", "IQ4_NL", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0", "F16")

    def candidates(self, shape):
        from edgeq.converters.gguf.ggml_quants import fits, tensor_bytes

        usable = [t for t in self.types if fits(t, shape)]
        return sorted(usable, key=lambda t: (tensor_bytes(t, shape), self.types.index(t)))

    def nbytes(self, precision, shape):
        from edgeq.converters.gguf.ggml_quants import tensor_bytes

        return tensor_bytes(precision, shape)

    def round_trip(self, weight, precision, importance):
        from edgeq.converters.gguf.ggml_quants import round_trip

        return round_trip(weight, precision, importance)

    def gptq_grid(self, precision, weight, importance):
        from edgeq.converters.gguf.blocks import grid_for

        return grid_for(precision, weight.shape[1])


def vocabulary_bytes(tokenizer: dict, n_vocab: int) -> int:
    """Bytes of the GGUF metadata `vocab.write_vocab` writes for a tokenizer.json: a length-prefixed string and an
    int32 type per token (the embedding's rows, unnamed ones padded), then a float32 score each for SentencePiece or
    a length-prefixed string per merge for byte-level BPE."""
    names = {i: t for t, i in tokenizer["model"]["vocab"].items()} if isinstance(tokenizer["model"].get("vocab"), dict) else {}
    names.update({t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])})
    strings = sum(8 + len(names.get(i, f"[PAD{i}]").encode()) for i in range(n_vocab))
    if tokenizer["model"].get("byte_fallback"):
        return strings + 8 * n_vocab
    merges = tokenizer["model"].get("merges", [])
    return strings + 4 * n_vocab + sum(8 + len((m if isinstance(m, str) else " ".join(m)).encode()) for m in merges)


class GGUFFormat(FormatSpec):
    name = "gguf"
    runtime = "llamacpp"
    converter_target = "edgeq.converters.gguf.convert:GGUFConverter"
    precisions = FLOAT_TYPES + QUANT_TYPES
    default_precision = "Q4_K_M"
    float_precision = "F32"
    planned_precision = "Q4_0"  # file type of a planned export; the plan overrides every tensor
    nominal_bpw = {"Q4_0": 4.5, "IQ4_NL": 4.5, "Q4_K_M": 4.85, "Q5_K_M": 5.69, "Q6_K": 6.56, "Q8_0": 8.5, "F16": 16.0}
    kv_element_bytes = 2  # llama.cpp's default f16 cache
    # what llama.cpp's `type_k`/`type_v` can store (bytes per element, the default first); a quantized cache needs
    # flash attention, which the engine turns on for it
    kv_cache_types = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
    options = ("rounding",)
    # GPTQ in each type's own blocks (converters/gguf/blocks.py) when calibration text is given; llama.cpp's own
    # importance-weighted search otherwise (GPTQ's pass over the float model costs minutes at 1B+)
    roundings = ("gptq", "nearest", "learned")
    gptq_needs_text = True
    gptq_precisions = QUANT_TYPES
    kept_adapters = "GGUF LoRA files (llama_adapter_lora_init)"
    hub_library = "gguf"
    run_elsewhere = ("With llama.cpp or Ollama (the chat template and stop tokens are in the file):\n\n```bash\n"
                     "llama-cli -m {model_file} -cnv\n"
                     "printf 'FROM ./{model_file}\\n' > Modelfile && ollama create {name} -f Modelfile && ollama run {name}\n```")

    def normalize(self, precision: str) -> str:
        return super().normalize(str(precision).upper())

    def tensor_type(self, asked: str) -> str:
        """A ggml tensor type (Q4_K, Q5_0, F16, ...): what a plan or `--tensor-type` names, unlike the file types of --precision."""
        import gguf  # pure Python

        name = str(asked).upper()
        if name not in gguf.GGMLQuantizationType.__members__:
            raise EdgeqError(f"unknown GGUF tensor type {asked!r}; use one of Q8_0, Q6_K, Q5_K, Q4_K, Q4_0, F16, ...")
        return name

    def file_overhead(self, source, tensors, context):
        """The vocabulary as `vocab.write_vocab` writes it, the other keys (the chat template among them) and each
        tensor's info with its alignment to 32 bytes. tokenizer.json's own size, JSON's quoting and every token's id,
        is about twice that: a plan at --size left the difference unspent."""
        tokenizer = source.tokenizer_folder / "tokenizer.json"
        vocabulary = vocabulary_bytes(json.loads(tokenizer.read_text()), source.vocab_size) if tokenizer.is_file() else 0
        return vocabulary + 1536 + 64 * tensors

    def space(self):
        return GGUFSpace()

    def check_source(self, source) -> None:
        """What llama.cpp's graph for this architecture cannot compute, refused by the option's name before any work.

        Its graphs hard-code what a config may vary: Gemma 3's attention scale, SmolLM3's NoPE step, where LongRoPE
        factors are read (Phi-3 only), that sliding windows exist at all (Gemma 3 only; Phi-3's is switched off)."""
        from edgeq.model_shape import ModelShape

        from .layout import graph

        arch, shape = graph(source), ModelShape.from_config(source.config)
        name = f"llama.cpp's {arch.arch} graph"

        def refuse(option: str, why: str) -> None:
            raise EdgeqError(f"{source.architecture} with {option} cannot be exported to GGUF ({name} {why}); export ONNX or Core ML")

        if shape.final_softcap and arch.arch != "gemma3":
            refuse(f"final_logit_softcapping = {shape.final_softcap}", "does not cap logits")
        if shape.sliding and not arch.sliding:
            refuse(f"sliding_window = {source.config.get('sliding_window')}", "has no sliding-window attention")
        if shape.sliding:
            local = {shape.rope_at(i) for i, w in enumerate(shape.windows) if w is not None}
            if len({w for w in shape.windows if w is not None}) > 1 or any(r is None or r.kind != "default" for r in local):
                refuse("per-layer windows or a scaled RoPE on the sliding layers", "has one window and an unscaled local RoPE")
        expected = (shape.hidden / shape.heads) ** -0.5 if arch.arch == "gemma3" and shape.layers == 62 else shape.head_dim ** -0.5
        if abs(shape.attention_scale - expected) > 1e-9 * expected:
            refuse(f"query_pre_attn_scalar = {source.config.get('query_pre_attn_scalar')}", f"scales q·k by {expected:.6g}")
        nope = [i for i in range(shape.layers) if shape.rope_at(i) is None]
        step = arch.nope_every
        if nope and (not step or nope != [i for i in range(shape.layers) if (i + 1) % step == 0]):
            refuse(f"no_rope_layers = {source.config.get('no_rope_layers')}",
                   f"skips RoPE on every {step}th layer only" if step else "rotates every layer")
        if shape.longrope and arch.arch != "phi3":
            refuse("LongRoPE scaling", "reads LongRoPE factors only for Phi-3")
        if shape.rotary_dim != shape.head_dim and arch.arch != "phi3":
            refuse(f"partial_rotary_factor = {shape.rotary_dim / shape.head_dim}", "rotates whole heads")


GGUF = GGUFFormat()
