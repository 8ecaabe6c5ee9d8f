"""Every supported model family in one table: what its checkpoint holds and how its block computes.

A family's facts that are not in its config.json live here, once: the tensor names its checkpoint
uses, the norm and activation of its block, the end-of-turn token its chat template writes. The torch
decoder (Core ML), the ONNX graph and the GGUF writer read them from the entry (what one runtime's graph
hard-codes for a family lives with that format: llama.cpp's in `edgeq.converters.gguf.layout`), so adding
a family is one entry plus whatever computation is truly new; what changes attention geometry or RoPE per layer (windows, local/global bases, partial rotary, LongRoPE, NoPE layers) is read
from the config by `edgeq.model_shape`. Families edgeq cannot export whole are refused here by reason.
Pure Python: intake, the CLI and the tokenizer import it cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import EdgeqError


@dataclass(frozen=True)
class Architecture:
    family: str                     # edgeq's name for it (manifests, converters)
    classes: tuple[str, ...]        # config.json `architectures` entries of this family
    # block
    activation: str = "silu"        # the GLU's gate: "silu", or "gelu_tanh" (GELU, tanh approximation)
    activation_key: str = "hidden_act"  # config field naming it, checked against `activation`
    norm_offset: float = 0.0        # RMSNorm multiplies by (offset + weight): Gemma stores weight - 1
    sandwich_norms: bool = False    # also norms after attention and after the MLP (Gemma 2/3); pre-MLP is pre_feedforward_layernorm
    embed_scale: bool = False       # embeddings times √hidden (Gemma)
    fused_qkv: bool = False         # one self_attn.qkv_proj, rows q then k then v (Phi-3)
    fused_gate_up: bool = False     # one mlp.gate_up_proj, gate rows first (Phi-3)
    # the text model of a multimodal checkpoint: its config key, its weight prefixes → edgeq's names, what is dropped
    text_config: str | None = None
    text_prefixes: tuple[tuple[str, str], ...] = ()
    dropped: tuple[str, ...] = ()
    # tokenizer
    turn_end: tuple[str, ...] = ()  # tokens the chat template ends a turn with (stop ids, llama.cpp's EOT)

    @property
    def tensor_names(self) -> dict[str, str]:
        """Per-layer tensor roles → the checkpoint's names under `model.layers.{i}.` (the shape check's table)."""
        attn = ("self_attn.qkv_proj",) if self.fused_qkv else ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        mlp = ("mlp.gate_up_proj",) if self.fused_gate_up else ("mlp.gate_proj", "mlp.up_proj")
        norms = ("input_layernorm", "post_attention_layernorm")
        if self.sandwich_norms:
            norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        return {"attention": attn, "mlp": mlp, "norms": norms}


_GEMMA3 = dict(
    activation="gelu_tanh", activation_key="hidden_activation", norm_offset=1.0, sandwich_norms=True,
    embed_scale=True, turn_end=("<end_of_turn>",),
)

ARCHITECTURES: dict[str, Architecture] = {a.family: a for a in (
    Architecture("llama", ("LlamaForCausalLM",),
                 turn_end=("<|eot_id|>", "<|im_end|>")),  # Llama 2/3.x, SmolLM/SmolLM2, TinyLlama
    Architecture("qwen2", ("Qwen2ForCausalLM",), turn_end=("<|im_end|>",)),    # Qwen2, Qwen2.5
    Architecture("qwen3", ("Qwen3ForCausalLM",), turn_end=("<|im_end|>",)),    # Qwen3 dense
    Architecture("gemma3", ("Gemma3ForCausalLM",), **_GEMMA3),                          # Gemma 3 270M, 1B (text only)
    Architecture("gemma3-multimodal", ("Gemma3ForConditionalGeneration",), **_GEMMA3,   # Gemma 3 4B+: its text model
                 text_config="text_config",
                 text_prefixes=(("language_model.model.", "model."), ("model.language_model.", "model."),
                                ("language_model.lm_head.", "lm_head.")),
                 dropped=("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")),
    Architecture("phi3", ("Phi3ForCausalLM",), fused_qkv=True, fused_gate_up=True,  # Phi-3/3.5-mini, Phi-4-mini
                 turn_end=("<|end|>",)),
    Architecture("smollm3", ("SmolLM3ForCausalLM",), turn_end=("<|im_end|>",)),
)}

BY_CLASS = {cls: arch for arch in ARCHITECTURES.values() for cls in arch.classes}
TURN_END_TOKENS = tuple(dict.fromkeys(t for arch in ARCHITECTURES.values() for t in arch.turn_end))

# Classes refused with the reason: exporting their attention layers alone would run, and be wrong.
REFUSED = {
    "Lfm2ForCausalLM": "a hybrid model (short convolution blocks between attention layers)",
    "Lfm2MoeForCausalLM": "a hybrid mixture-of-experts model",
    "Qwen3NextForCausalLM": "a hybrid model (Gated DeltaNet linear-attention layers)",
    "Qwen3_5ForCausalLM": "a hybrid model (Gated DeltaNet linear-attention layers)",
    "Qwen3_5ForConditionalGeneration": "a hybrid model (Gated DeltaNet linear-attention layers)",
    "Qwen3_5MoeForConditionalGeneration": "a hybrid mixture-of-experts model",
    "FalconH1ForCausalLM": "a hybrid model (Mamba2 layers)",
    "JambaForCausalLM": "a hybrid model (Mamba layers) with mixture-of-experts",
    "MambaForCausalLM": "a recurrent (state-space) model", "Mamba2ForCausalLM": "a recurrent (state-space) model",
    "RecurrentGemmaForCausalLM": "a recurrent model (RG-LRU blocks)",
    "Gemma3nForConditionalGeneration": "Gemma 3n (per-layer embeddings, AltUp and LAuReL blocks)",
    "Gemma3nForCausalLM": "Gemma 3n (per-layer embeddings, AltUp and LAuReL blocks)",
    "MixtralForCausalLM": "a mixture-of-experts model", "Qwen2MoeForCausalLM": "a mixture-of-experts model",
    "Qwen3MoeForCausalLM": "a mixture-of-experts model", "PhiMoEForCausalLM": "a mixture-of-experts model",
    "OlmoeForCausalLM": "a mixture-of-experts model", "GraniteMoeForCausalLM": "a mixture-of-experts model",
    "DeepseekV3ForCausalLM": "a mixture-of-experts model", "GptOssForCausalLM": "a mixture-of-experts model",
}
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def for_config(config: dict) -> Architecture:
    """The family of a config.json, or a one-line refusal naming the class (and why, when edgeq knows)."""
    names = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    arch = next((BY_CLASS[a] for a in names if a in BY_CLASS), None)
    if arch is None:
        reason = next((f"{a} is {REFUSED[a]}, which edgeq does not export" for a in names if a in REFUSED), None)
        reason = reason or f"architecture {', '.join(names)} is not supported"
        raise EdgeqError(f"{reason}; supported: {', '.join(BY_CLASS)}")
    return arch


def text_config(arch: Architecture, config: dict, load_full) -> dict:
    """The config of the model edgeq exports: the text model's for a multimodal checkpoint.

    `load_full()` returns the checkpoint's text config with transformers' defaults filled in (a saved
    config omits sub-config fields left at their default)."""
    if arch.text_config is None:
        return config
    if not isinstance(config.get(arch.text_config), dict):
        raise EdgeqError(f"config.json of a {config['architectures'][0]} checkpoint has no {arch.text_config}; re-save it with transformers")
    text = dict(load_full())
    text["architectures"] = list(config["architectures"])
    if "tie_word_embeddings" in config:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    return text


def check_options(arch: Architecture, config: dict) -> None:
    """Config options of a supported family that no edgeq engine computes: refused by name, before any work."""
    def refuse(option: str, why: str) -> None:
        raise EdgeqError(f"{config['architectures'][0]} with {option} is not supported ({why}); export a checkpoint without it")

    for key in _EXPERT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 1:
            refuse(f"{key} = {config[key]}", "mixture-of-experts layers")
    act = config.get(arch.activation_key)
    expected = {"silu": ("silu", "swish"), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_tanh")}[arch.activation]
    if act is not None and act not in expected:
        refuse(f"{arch.activation_key} = {act!r}", f"this family's MLP is computed with {expected[0]}")
    if config.get("mlp_bias"):
        refuse("mlp_bias", "biases on the MLP projections")
    if config.get("attn_logit_softcapping"):  # Gemma 2's; Gemma 3 configs carry the field, transformers ignores it
        refuse(f"attn_logit_softcapping = {config['attn_logit_softcapping']}",
               "transformers' Gemma 3 does not apply it, so an export that did would not match the model as trained")
    if config.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention", "a non-causal encoder such as EmbeddingGemma")


def check_tensors(arch: Architecture, shapes: dict) -> None:
    """Tensors the checkpoint holds that no edgeq engine computes (an output-projection bias)."""
    extra = next((n for n in shapes if n.endswith(("self_attn.o_proj.bias", "mlp.down_proj.bias", "lm_head.bias"))), None)
    if extra:
        raise EdgeqError(f"{extra}: this checkpoint has output-projection biases, which edgeq's engines do not compute; "
                         "export a checkpoint without them")


def text_tensor_name(arch: Architecture, name: str) -> str | None:
    """edgeq's name of a checkpoint tensor (the text model's under `model.`), or None for a dropped part."""
    for prefix, replacement in arch.text_prefixes:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    if name.startswith(arch.dropped):
        return None
    return name
