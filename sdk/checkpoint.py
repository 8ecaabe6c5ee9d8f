"""A checkpoint's config.json checked against a schema, and its weights against the config.

Every converter, the decoder and planning read the config as plain numbers; a config with a string
where a number belongs, zero heads or more layers than the weights hold would fail deep inside one
of them as a KeyError or ZeroDivisionError. Here it fails once, in one line naming the field, and so do
weights that are missing, shaped for another config, or not floating point at all.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from .errors import EdgeqError
from .validate import first_error

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def layer_index(name: str) -> int:
    """The decoder layer an HF weight name belongs to, or -1 (the embedding, the final norm, the head)."""
    m = _LAYER.match(name)
    return int(m[1]) if m else -1
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ModelConfig(BaseModel):
    """The fields edgeq reads; the rest of config.json passes through unread."""

    model_config = ConfigDict(extra="allow", strict=True, defer_build=True)
    architectures: Annotated[list[str], Field(min_length=1)]
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    vocab_size: PositiveInt
    rms_norm_eps: Positive
    max_position_embeddings: PositiveInt | None = None
    rope_theta: Positive | None = None
    tie_word_embeddings: bool | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    quantization_config: dict | None = None


def check_config(config, path: Path) -> None:
    """Types, required fields and the head arithmetic every engine relies on."""
    fix = "fix config.json so it describes the checkpoint (or re-save it with transformers)"
    if not isinstance(config, dict):
        raise EdgeqError(f"{path} must hold a JSON object; {fix}")
    try:
        c = ModelConfig.model_validate(config)
    except ValidationError as exc:
        field, message = first_error(exc)
        raise EdgeqError(f"{path}: {field}: {message}; {fix}") from None
    kv = c.num_key_value_heads or c.num_attention_heads
    if c.num_attention_heads % kv:
        raise EdgeqError(f"{path}: num_attention_heads ({c.num_attention_heads}) is not a multiple of "
                         f"num_key_value_heads ({kv}); {fix}")
    if c.head_dim is None and c.hidden_size % c.num_attention_heads:
        raise EdgeqError(f"{path}: hidden_size ({c.hidden_size}) is not a multiple of num_attention_heads "
                         f"({c.num_attention_heads}) and no head_dim is given; {fix}")


def expected_shapes(config: dict, vocab: int, arch=None) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor a supported decoder must have (biases and q/k norms are optional extras);
    `arch` (`edgeq.architectures.Architecture`) names fused projections and extra norms."""
    hidden, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    names = arch.tensor_names if arch is not None else {"attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                                         "mlp": ("mlp.gate_proj", "mlp.up_proj"),
                                                         "norms": ("input_layernorm", "post_attention_layernorm")}
    rows = {"self_attn.q_proj": heads * head_dim, "self_attn.k_proj": kv * head_dim, "self_attn.v_proj": kv * head_dim,
            "self_attn.qkv_proj": (heads + 2 * kv) * head_dim, "mlp.gate_proj": inter, "mlp.up_proj": inter, "mlp.gate_up_proj": 2 * inter}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + f"{n}.weight": (hidden,) for n in names["norms"]})
        shapes.update({p + f"{n}.weight": (rows[n], hidden) for n in names["attention"] + names["mlp"]})
        shapes.update({p + "self_attn.o_proj.weight": (hidden, heads * head_dim), p + "mlp.down_proj.weight": (hidden, inter)})
    return shapes


def optional_shapes(config: dict, vocab: int) -> dict[str, tuple[int, ...]]:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"lm_head.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        shapes.update({p + "q_proj.bias": (heads * head_dim,), p + "k_proj.bias": (kv * head_dim,), p + "v_proj.bias": (kv * head_dim,),
                       p + "q_norm.weight": (head_dim,), p + "k_norm.weight": (head_dim,)})
    return shapes


def check_weights(config: dict, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str], path: Path, arch=None) -> None:
    """The weights the config implies (for family `arch`) are all there, with the shapes it implies, and floating point."""
    layers = {int(m[1]) for name in shapes if (m := _LAYER.match(name))}
    held = max(layers) + 1 if layers else 0
    if held != config["num_hidden_layers"]:
        raise EdgeqError(f"{path}/config.json says num_hidden_layers = {config['num_hidden_layers']} but the weights hold "
                         f"{held} layers; fix the config or the checkpoint (a missing shard?)")
    embed = shapes.get("model.embed_tokens.weight")
    vocab = embed[0] if embed else config["vocab_size"]
    required = expected_shapes(config, vocab, arch)
    for name, shape in required.items():
        if name not in shapes:
            raise EdgeqError(f"the weights in {path} lack {name}; the checkpoint is incomplete (re-download or re-save it)")
    extras = optional_shapes(config, vocab)
    for name, shape in shapes.items():
        want = required.get(name) or extras.get(name)
        if want is not None and tuple(shape) != want:
            raise EdgeqError(f"{name} in {path} has shape {tuple(shape)} but config.json implies {want}; "
                             "the weights and config.json belong to different models")
        if dtypes.get(name, "F32") not in FLOAT_DTYPES:
            raise EdgeqError(f"{name} in {path} is stored as {dtypes[name]}, not floating point; edgeq exports "
                             f"full-precision checkpoints ({', '.join(FLOAT_DTYPES)}): export from the original weights")


def check_finite(name: str, tensor, where: Path) -> None:
    """NaN or inf in a weight (a diverged fine-tune, a bad merge) would export "successfully" with a KL of nan.
    A slice's sum is finite unless some element is not (or the sum overflows, which `isfinite` then settles):
    one pass without a mask, a tenth of `isfinite`'s time, and in slices, so no copy of a large embedding."""
    import torch

    if not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), 1 << 24):
        part = flat[start:start + (1 << 24)]
        if not part.sum().isfinite() and not torch.isfinite(part).all():
            raise EdgeqError(f"{name} in {where} holds NaN or infinite values; the checkpoint is damaged (a diverged "
                             "fine-tune or a bad merge?): export a healthy one")
