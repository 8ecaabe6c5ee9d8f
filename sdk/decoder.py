"""An export-friendly decoder in plain torch for every supported family (`edgeq.architectures`).

Converters trace this module instead of transformers' model: every step is an explicit op a
graph compiler understands (no dynamic cache classes, no `diff`, no data-dependent shapes).
The KV cache lives in two registered buffers of a fixed maximum context that `forward` updates
in place, which is what Core ML (and other exporters) turn into model *state*. Module names
follow the HF checkpoint (`model.layers.3.mlp.down_proj`), so weights load by their HF names and
exported op names map back to them.

One call of `forward(input_ids, position_ids)` processes `T` tokens at consecutive positions: it
writes their keys/values into the cache and attends over the whole cache with an explicit causal
mask (slots beyond the current position are masked, and get overwritten before they are read).
A sliding-window layer masks the slots that left its window as well; its cache stays full size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model_shape import ModelShape

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
    inv_freq: tuple[float, ...]  # RoPE table 0 (the full-attention layers'); tables 1.. in `more_inv_freqs`
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    # what differs between families (defaults: Llama's block) and per layer
    norm_offset: float = 0.0        # RMSNorm gain (offset + weight), Gemma: 1
    sandwich_norms: bool = False    # Gemma: norms after attention and MLP
    activation: str = "silu"        # "silu" | "gelu_tanh"
    embed_scale: float = 1.0        # Gemma: √hidden
    fused_qkv: bool = False         # Phi-3: one qkv_proj
    fused_gate_up: bool = False     # Phi-3: one gate_up_proj
    rotary_dim: int = 0             # leading dims of a head RoPE rotates (0: all)
    scale: float = 0.0              # on q·k (0: 1/√head_dim)
    more_inv_freqs: tuple = ()      # further RoPE tables (Gemma's local layers)
    rope_scales: tuple = ()         # per table: cos/sin factor (YaRN, LongRoPE); empty: 1
    layer_rope: tuple = ()          # per layer: its RoPE table, -1 for none (NoPE); empty: table 0 everywhere
    windows: tuple = ()             # per layer: sliding window (keys seen, itself included) or None
    final_softcap: float | None = None

    @classmethod
    def from_source(cls, source, context: int) -> "DecoderSpec":
        """Reads hyperparameters from the config, block facts from the family's entry, optional tensors (biases,
        q/k norms) from the shapes. LongRoPE takes the factor set a `context`-token sequence gets in transformers."""
        config, shapes, arch = source.config, source.shapes(), source.arch
        shape = ModelShape.from_config(config)
        tables = shape.distinct_ropes()
        long = shape.uses_long_factors(context)
        freqs = [tuple(r.inv_freq(shape.rotary_dim, shape.max_positions, long)) for r in tables]
        layer_rope = tuple(-1 if shape.rope_at(i) is None else next(k for k, r in enumerate(tables) if r is shape.rope_at(i))
                           for i in range(shape.layers))
        return cls(
            vocab=shapes["model.embed_tokens.weight"][0], hidden=shape.hidden, layers=shape.layers,
            heads=shape.heads, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
            intermediate=config["intermediate_size"], eps=config["rms_norm_eps"], context=context,
            inv_freq=freqs[0] if freqs else (), more_inv_freqs=tuple(freqs[1:]),
            rope_scales=tuple(r.attention_factor() for r in tables), layer_rope=layer_rope,
            tied=bool(config.get("tie_word_embeddings")) or "lm_head.weight" not in shapes,
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in shapes,
            qk_norm="model.layers.0.self_attn.q_norm.weight" in shapes,
            norm_offset=arch.norm_offset, sandwich_norms=arch.sandwich_norms, activation=arch.activation,
            embed_scale=math.sqrt(shape.hidden) if arch.embed_scale else 1.0,
            fused_qkv=arch.fused_qkv, fused_gate_up=arch.fused_gate_up, rotary_dim=shape.rotary_dim,
            scale=shape.attention_scale, windows=shape.windows,
            final_softcap=shape.final_softcap,
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "inv_freq": list(self.inv_freq), "more_inv_freqs": [list(f) for f in self.more_inv_freqs],
                "rope_scales": list(self.rope_scales), "layer_rope": list(self.layer_rope), "windows": list(self.windows)}

    @classmethod
    def from_dict(cls, data: dict) -> "DecoderSpec":
        tuples = {k: tuple(data[k]) for k in ("inv_freq", "rope_scales", "layer_rope", "windows") if k in data}
        if "more_inv_freqs" in data:
            tuples["more_inv_freqs"] = tuple(tuple(f) for f in data["more_inv_freqs"])
        return cls(**{**data, **tuples})

    @property
    def tables(self) -> tuple[tuple[float, ...], ...]:
        return (self.inv_freq, *self.more_inv_freqs)

    def rope_table(self, layer: int) -> int:
        return self.layer_rope[layer] if self.layer_rope else 0

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None


class RMSNorm(nn.Module):
    """RMSNorm written as a LayerNorm of [x, -x]: the mean is exactly zero, so the variance LayerNorm
    divides by is mean(x²). Core ML runs LayerNorm as one fused op, which avoids overflowing
    float16 with an explicit x² of large activations. The gain is `offset + weight` (Gemma: 1 + weight)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim, self.eps, self.offset = dim, eps, offset

    def forward(self, x):
        both = F.layer_norm(torch.cat([x, -x], dim=-1), (2 * self.dim,), eps=self.eps)
        return both[..., :self.dim] * (self.weight + self.offset if self.offset else self.weight)


def rotate(x, cos, sin):
    """HF's rotate-half RoPE on the leading `2 * cos.shape[-1] / 2` dims of each head (all of them
    unless the family rotates part of the head): the two halves are the (real, imaginary) pairs."""
    dim = cos.shape[-1]
    rot, rest = (x, None) if dim == x.shape[-1] else (x[..., :dim], x[..., dim:])
    first, second = rot.chunk(2, dim=-1)
    out = rot * cos + torch.cat([-second, first], dim=-1) * sin
    return out if rest is None else torch.cat([out, rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, index: int):
        super().__init__()
        self.spec, self.index = spec, index
        q_dim, kv_dim = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        if spec.fused_qkv:
            self.qkv_proj = nn.Linear(spec.hidden, q_dim + 2 * kv_dim, bias=spec.qkv_bias)
        else:
            self.q_proj = nn.Linear(spec.hidden, q_dim, bias=spec.qkv_bias)
            self.k_proj = nn.Linear(spec.hidden, kv_dim, bias=spec.qkv_bias)
            self.v_proj = nn.Linear(spec.hidden, kv_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(q_dim, spec.hidden, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.eps, spec.norm_offset)
            self.k_norm = RMSNorm(spec.head_dim, spec.eps, spec.norm_offset)

    def projections(self, x):
        s = self.spec
        if not s.fused_qkv:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
        return self.qkv_proj(x).split([q_dim, kv_dim, kv_dim], dim=-1)

    def forward(self, x, rope, mask, position, caches):
        # Shapes use -1 for the token axis: traced sizes turn into ops coremltools cannot fold.
        s, t = self.spec, x.shape[1]
        q, k, v = self.projections(x)
        q = q.reshape(1, -1, s.heads, s.head_dim).transpose(1, 2)
        k = k.reshape(1, -1, s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.reshape(1, -1, s.kv_heads, s.head_dim).transpose(1, 2)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # None: a NoPE layer
            q, k = rotate(q, *rope), rotate(k, *rope)
        key_cache, value_cache = caches
        # In-place writes into the state buffers: Core ML turns these into slice_update on its state.
        key_cache[self.index, :, position:position + t] = k[0].to(key_cache.dtype)
        value_cache[self.index, :, position:position + t] = v[0].to(value_cache.dtype)
        keys = key_cache[self.index].to(q.dtype)  # (kv_heads, context, head_dim)
        values = value_cache[self.index].to(q.dtype)
        # Grouped-query attention without repeating the cache: fold each KV head's query group into rows.
        group = s.heads // s.kv_heads
        q = q.reshape(s.kv_heads, -1, s.head_dim) * (s.scale or 1.0 / math.sqrt(s.head_dim))
        scores = torch.matmul(q, keys.transpose(1, 2)).view(s.kv_heads, group, -1, s.context)
        probs = torch.softmax(scores + mask, dim=-1).view(s.kv_heads, -1, s.context)
        out = torch.matmul(probs, values).view(s.heads, -1, s.head_dim).transpose(0, 1).reshape(1, -1, s.heads * s.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        if spec.fused_gate_up:
            self.gate_up_proj = nn.Linear(spec.hidden, 2 * spec.intermediate, bias=False)
        else:
            self.gate_proj = nn.Linear(spec.hidden, spec.intermediate, bias=False)
            self.up_proj = nn.Linear(spec.hidden, spec.intermediate, bias=False)
        self.down_proj = nn.Linear(spec.intermediate, spec.hidden, bias=False)

    def forward(self, x):
        if self.spec.fused_gate_up:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.spec.activation == "gelu_tanh" else F.silu(gate)
        return self.down_proj(act * up)


class Layer(nn.Module):
    def __init__(self, spec: DecoderSpec, index: int):
        super().__init__()
        norm = lambda: RMSNorm(spec.hidden, spec.eps, spec.norm_offset)  # noqa: E731
        self.sandwich = spec.sandwich_norms
        self.input_layernorm = norm()
        self.self_attn = Attention(spec, index)
        self.post_attention_layernorm = norm()  # Llama: before the MLP; Gemma: after attention
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(spec)

    def forward(self, x, rope, mask, position, caches):
        attn = self.self_attn(self.input_layernorm(x), rope, mask, position, caches)
        if not self.sandwich:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Body(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab, spec.hidden)
        self.layers = nn.ModuleList(Layer(spec, i) for i in range(spec.layers))
        self.norm = RMSNorm(spec.hidden, spec.eps, spec.norm_offset)


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
        for k, inv_freq in enumerate(spec.tables):  # one cos/sin table per distinct RoPE (Gemma: local and global)
            angles = torch.outer(torch.arange(spec.context, **cpu64), torch.tensor(inv_freq, **cpu64))
            angles = torch.cat([angles, angles], dim=-1)
            factor = spec.rope_scales[k] if spec.rope_scales else 1.0
            self.register_buffer(f"rope_cos{k or ''}", (angles.cos() * factor).float(), persistent=False)
            self.register_buffer(f"rope_sin{k or ''}", (angles.sin() * factor).float(), persistent=False)
        self.register_buffer("slots", torch.arange(spec.context, dtype=torch.int32, device="cpu"), persistent=False)

    def forward(self, input_ids, position_ids):
        """`position_ids` are consecutive (p .. p+T-1): the caller passes them, so every index stays an
        integer input (arithmetic on traced sizes would be folded to float16 by Core ML's converter)."""
        spec = self.spec
        positions = position_ids[0]
        start = positions[0]
        ropes = [(getattr(self, f"rope_cos{k or ''}")[positions].to(self.dtype), getattr(self, f"rope_sin{k or ''}")[positions].to(self.dtype))
                 for k in range(len(spec.tables))]
        # Explicit causal mask over the whole fixed-size cache: slot j is visible to the token at p iff j <= p
        # (and, in a sliding-window layer of window w, p - j < w). Arithmetic, not `where(visible, 0, -inf)`:
        # Core ML would store both branches broadcast to (T, context).
        slots, rows = self.slots.view(1, -1), positions.view(-1, 1)
        masks = {}
        for window in {spec.window(i) for i in range(spec.layers)}:
            visible = slots <= rows if window is None else (slots <= rows) & (slots > rows - window)
            masks[window] = (visible.to(self.dtype) - 1.0) * MASKED
        x = self.model.embed_tokens(input_ids)
        if spec.embed_scale != 1.0:
            x = x * spec.embed_scale
        caches = (self.key_cache, self.value_cache)
        for i, layer in enumerate(self.model.layers):
            table = spec.rope_table(i)
            x = layer(x, ropes[table] if table >= 0 else None, masks[spec.window(i)], start, caches)
        x = self.model.norm(x)
        # an untied head is called as a module: a LoRA put in its place (Core ML's kept adapters) then applies
        logits = F.linear(x, self.model.embed_tokens.weight) if spec.tied else self.lm_head(x)
        if spec.final_softcap:
            logits = torch.tanh(logits / spec.final_softcap) * spec.final_softcap
        return logits

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
