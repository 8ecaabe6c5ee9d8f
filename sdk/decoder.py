"""An export-friendly decoder in plain torch for the supported families (Llama, Qwen2, Qwen3).

Converters trace this module instead of transformers' model: every step is an explicit op a
graph compiler understands (no dynamic cache classes, no `diff`, no data-dependent shapes).
The KV cache lives in two registered buffers of a fixed maximum context that `forward` updates
in place, which is what Core ML (and other exporters) turn into model *state*. Module names
follow the HF checkpoint (`model.layers.3.mlp.down_proj`), so weights load by their HF names and
exported op names map back to them.

One call of `forward(input_ids, position_ids)` processes `T` tokens at consecutive positions: it
writes their keys/values into the cache and attends over the whole cache with an explicit causal
mask (slots beyond the current position are masked, and get overwritten before they are read).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import EdgeqError

MASKED = 65504.0  # the largest float16: added to a masked score, its softmax weight is exactly zero


@dataclass(frozen=True)
class DecoderSpec:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    context: int
    inv_freq: tuple[float, ...]
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_source(cls, source, context: int) -> "DecoderSpec":
        """Reads hyperparameters from the config and optional tensors (biases, q/k norms) from the shapes."""
        config, shapes = source.config, source.shapes()
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return cls(
            vocab=shapes["model.embed_tokens.weight"][0], hidden=config["hidden_size"], layers=config["num_hidden_layers"],
            heads=heads, kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
            intermediate=config["intermediate_size"], eps=config["rms_norm_eps"], context=context,
            inv_freq=tuple(rope_inv_freq(config, head_dim)),
            tied=bool(config.get("tie_word_embeddings")) or "lm_head.weight" not in shapes,
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in shapes,
            qk_norm="model.layers.0.self_attn.q_norm.weight" in shapes,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "inv_freq": list(self.inv_freq)}

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderSpec":
        return cls(**{**data, "inv_freq": tuple(data["inv_freq"])})


def rope_inv_freq(config: dict, head_dim: int) -> list[float]:
    """RoPE inverse frequencies, including Llama 3.x long-context scaling (computed as transformers does)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    inv = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if kind == "default":
        return inv
    if kind != "llama3":
        raise EdgeqError(f"RoPE scaling {kind!r} is not supported by edgeq's decoder yet; supported: none, llama3")
    factor, low, high = params["factor"], params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params["original_max_position_embeddings"]
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        smooth = min(max((old_ctx / wavelen - low) / (high - low), 0.0), 1.0)
        out.append((1 - smooth) * f / factor + smooth * f)
    return out


class RMSNorm(nn.Module):
    """RMSNorm written as a LayerNorm of [x, -x]: the mean is exactly zero, so the variance LayerNorm
    divides by is mean(x²). Core ML runs LayerNorm as one fused op, which avoids overflowing
    float16 with an explicit x² of large activations."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim, self.eps = dim, eps

    def forward(self, x):
        both = F.layer_norm(torch.cat([x, -x], dim=-1), (2 * self.dim,), eps=self.eps)
        return both[..., :self.dim] * self.weight


def rotate(x, cos, sin):
    """HF's rotate-half RoPE: the two halves of each head are the (real, imaginary) pairs."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, index: int):
        super().__init__()
        self.spec, self.index = spec, index
        q_dim, kv_dim = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        self.q_proj = nn.Linear(spec.hidden, q_dim, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden, kv_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden, kv_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(q_dim, spec.hidden, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.eps)

    def forward(self, x, cos, sin, mask, position, caches):
        # Shapes use -1 for the token axis: traced sizes turn into ops coremltools cannot fold.
        s, t = self.spec, x.shape[1]
        q = self.q_proj(x).view(1, -1, s.heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(1, -1, s.kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(1, -1, s.kv_heads, s.head_dim).transpose(1, 2)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        key_cache, value_cache = caches
        # In-place writes into the state buffers: Core ML turns these into slice_update on its state.
        key_cache[self.index, :, position:position + t] = k[0].to(key_cache.dtype)
        value_cache[self.index, :, position:position + t] = v[0].to(value_cache.dtype)
        keys = key_cache[self.index].to(q.dtype)  # (kv_heads, context, head_dim)
        values = value_cache[self.index].to(q.dtype)
        # Grouped-query attention without repeating the cache: fold each KV head's query group into rows.
        group = s.heads // s.kv_heads
        q = q.reshape(s.kv_heads, -1, s.head_dim) * (1.0 / math.sqrt(s.head_dim))
        scores = torch.matmul(q, keys.transpose(1, 2)).view(s.kv_heads, group, -1, s.context)
        probs = torch.softmax(scores + mask, dim=-1).view(s.kv_heads, -1, s.context)
        out = torch.matmul(probs, values).view(s.heads, -1, s.head_dim).transpose(0, 1).reshape(1, -1, s.heads * s.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden, spec.intermediate, bias=False)
        self.up_proj = nn.Linear(spec.hidden, spec.intermediate, bias=False)
        self.down_proj = nn.Linear(spec.intermediate, spec.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, spec: DecoderSpec, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden, spec.eps)
        self.self_attn = Attention(spec, index)
        self.post_attention_layernorm = RMSNorm(spec.hidden, spec.eps)
        self.mlp = MLP(spec)

    def forward(self, x, cos, sin, mask, position, caches):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, position, caches)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab, spec.hidden)
        self.layers = nn.ModuleList(Layer(spec, i) for i in range(spec.layers))
        self.norm = RMSNorm(spec.hidden, spec.eps)


class Decoder(nn.Module):
    """`forward(input_ids (1, T) int, position_ids (1, T) int) -> logits (1, T, vocab)`; the cache is state."""

    def __init__(self, spec: DecoderSpec, cache_dtype=torch.float16):
        super().__init__()
        self.spec = spec
        self.model = Body(spec)
        if not spec.tied:
            self.lm_head = nn.Linear(spec.hidden, spec.vocab, bias=False)
        shape = (spec.layers, spec.kv_heads, spec.context, spec.head_dim)
        self.register_buffer("key_cache", torch.zeros(shape, dtype=cache_dtype, device="cpu"))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=cache_dtype, device="cpu"))
        cpu64 = dict(dtype=torch.float64, device="cpu")
        angles = torch.outer(torch.arange(spec.context, **cpu64), torch.tensor(spec.inv_freq, **cpu64))
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)
        self.register_buffer("slots", torch.arange(spec.context, dtype=torch.int32, device="cpu"), persistent=False)

    def forward(self, input_ids, position_ids):
        """`position_ids` are consecutive (p .. p+T-1): the caller passes them, so every index stays an
        integer input (arithmetic on traced sizes would be folded to float16 by Core ML's converter)."""
        positions = position_ids[0]
        start = positions[0]
        cos, sin = self.rope_cos[positions].to(self.dtype), self.rope_sin[positions].to(self.dtype)
        # Explicit causal mask over the whole fixed-size cache: slot j is visible to the token at p iff j <= p.
        # Arithmetic, not `where(visible, 0, -inf)`: Core ML would store both branches broadcast to (T, context).
        visible = (self.slots.view(1, -1) <= positions.view(-1, 1)).to(self.dtype)
        mask = (visible - 1.0) * MASKED
        x = self.model.embed_tokens(input_ids)
        caches = (self.key_cache, self.value_cache)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, start, caches)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.spec.tied else self.lm_head.weight
        return F.linear(x, head)

    @property
    def dtype(self):
        return self.model.norm.weight.dtype

    def reset(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def weight_names(self) -> list[str]:
        """HF names of the parameters to load (the cache and RoPE tables are buffers)."""
        return [name for name, _ in self.named_parameters()]


def build_decoder(spec: DecoderSpec, load, dtype=torch.float32, cache_dtype=None, progress=None) -> Decoder:
    """A decoder whose weights come from `load(hf_name) -> tensor`, one tensor at a time.

    `load` is `SourceModel.tensor` for the merged checkpoint, or a reader of weights dequantized
    from an exported package; `dtype` is the parameter dtype (float16 halves a converter's memory).
    """
    from .progress import bar

    with torch.device("meta"):  # parameters start empty; buffers are built on the CPU (explicit device)
        decoder = Decoder(spec, cache_dtype or dtype)
    names = decoder.weight_names()
    with bar(len(names), "load weights", "tensor", progress) as pbar, torch.no_grad():
        for name in names:
            module_name, _, leaf = name.rpartition(".")
            tensor = torch.as_tensor(load(name)).to(dtype)
            setattr(decoder.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
            pbar.update(1)
    return decoder.eval()
