"""What a model *is*, read once from its config: attention geometry, KV-cache cost and RoPE frequencies.

The decoder, every converter, planning and profiling need the same few numbers; computed in one place
they cannot disagree (a head_dim guessed from hidden/heads where the config names another, a RoPE
scaling one writer knows and another ignores). Pure Python: no torch, so the CLI can use it cheaply.

Per layer, a model may differ in two ways that change the numbers an engine computes, and both are
read here rather than in each writer:
- its attention window: sliding-window layers (Gemma 3: five of six, Phi-3-mini-4k: all) see only the
  last `window` keys, the token itself included, as transformers' sliding mask does;
- its RoPE: Gemma 3 rotates local layers with another base than global ones, SmolLM3 skips RoPE on
  every fourth layer (NoPE: `rope_at(i)` is None), Phi-4-mini rotates only part of each head
  (`rotary_dim`), and Phi-3's LongRoPE has a short and a long set of per-frequency factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import EdgeqError

# RoPE scalings whose frequencies any engine can hold as a table. "longrope" has two tables (short and long
# factors) chosen by the sequence length against the pretraining context; "dynamic" changes with every length
# and is refused by name.
ROPE_SCALINGS = ("default", "linear", "llama3", "yarn", "longrope")
_ALIASES = {"su": "longrope"}  # Phi-3's first configs named LongRoPE "su"
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Rope:
    theta: float
    kind: str = "default"
    params: dict = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_config(cls, config: dict) -> "Rope":
        """The RoPE of a config with one RoPE for every layer (or of its full-attention layers)."""
        # transformers ≥ 4.56 writes `rope_parameters` (theta inside); older configs `rope_scaling` + `rope_theta`
        params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        if FULL in params or SLIDING in params:
            params = dict(params.get(FULL) or {})
        return cls.from_params(params, config, config.get("rope_theta"))

    @classmethod
    def from_params(cls, params: dict, config: dict, theta: float | None = None) -> "Rope":
        params = dict(params)
        theta = float(params.get("rope_theta") or theta or 10000.0)
        kind = params.get("rope_type") or params.get("type") or "default"
        kind = _ALIASES.get(kind, kind)
        if kind not in ROPE_SCALINGS:
            raise EdgeqError(f"RoPE scaling {kind!r} is not supported (its frequencies depend on the sequence length); "
                             f"supported: {', '.join(ROPE_SCALINGS)}")
        if kind in ("llama3", "yarn", "longrope"):  # Phi-3 writes the pretraining context beside rope_scaling, not in it
            original = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
            if original:
                params["original_max_position_embeddings"] = original
        if kind == "longrope":
            missing = [k for k in ("short_factor", "long_factor", "original_max_position_embeddings") if not params.get(k)]
            if missing:
                raise EdgeqError(f"LongRoPE scaling without {', '.join(missing)}; fix the model's config.json")
            if params.get("factor") is None:  # transformers: the ratio of the two contexts
                params["factor"] = config.get("max_position_embeddings", 4096) / params["original_max_position_embeddings"]
        return cls(theta, kind, params)

    def base_inv_freq(self, dim: int) -> list[float]:
        return [1.0 / self.theta ** (i / dim) for i in range(0, dim, 2)]

    @property
    def original_context(self) -> int | None:
        return self.params.get("original_max_position_embeddings")

    def inv_freq(self, dim: int, max_positions: int, long: bool = False) -> list[float]:
        """Inverse frequencies after scaling, as transformers' `ROPE_INIT_FUNCTIONS` computes them.
        `long` picks LongRoPE's long factors (transformers: a sequence longer than the pretraining context)."""
        inv = self.base_inv_freq(dim)
        p = self.params
        if self.kind == "linear":
            return [f / p["factor"] for f in inv]
        if self.kind == "llama3":
            factor, low, high = p["factor"], p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
            old_ctx = p["original_max_position_embeddings"]
            out = []
            for f in inv:
                smooth = min(max((old_ctx / (2 * math.pi / f) - low) / (high - low), 0.0), 1.0)
                out.append((1 - smooth) * f / factor + smooth * f)
            return out
        if self.kind == "yarn":
            return self._yarn(inv, dim, max_positions)
        if self.kind == "longrope":
            factors = self.longrope_factors(dim, long)
            return [f / e for f, e in zip(inv, factors)]
        return inv

    def longrope_factors(self, dim: int, long: bool) -> list[float]:
        """LongRoPE's per-frequency divisors (one per rotated pair), checked against the rotated width."""
        factors = [float(f) for f in self.params["long_factor" if long else "short_factor"]]
        if len(factors) != dim // 2:
            raise EdgeqError(f"LongRoPE has {len(factors)} factors but the model rotates {dim // 2} pairs; fix the model's config.json")
        return factors

    def attention_factor(self) -> float:
        """Scale on cos/sin: YaRN's temperature, LongRoPE's √(1 + ln s / ln L); 1 for every other scaling."""
        given = self.params.get("attention_factor")
        if self.kind == "yarn":
            factor = self.params["factor"]
            if given is not None:
                return float(given)
            return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        if self.kind == "longrope":
            if given is not None:
                return float(given)
            factor, original = self.params["factor"], self.params["original_max_position_embeddings"]
            return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        return 1.0

    def _yarn(self, inv: list[float], dim: int, max_positions: int) -> list[float]:
        p = self.params
        factor = p["factor"]
        old_ctx = p.get("original_max_position_embeddings") or max_positions // factor
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        out = []
        for i, f in enumerate(inv):
            extrapolate = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
            out.append((f / factor) * (1 - extrapolate) + f * extrapolate)
        return out


def layer_types(config: dict) -> list[str]:
    """"sliding_attention" or "full_attention" per layer, as transformers derives them."""
    layers = config["num_hidden_layers"]
    types = config.get("layer_types")
    if types is not None:
        if len(types) != layers or any(t not in (SLIDING, FULL) for t in types):
            raise EdgeqError(f"layer_types {types!r} is not one of {SLIDING!r}/{FULL!r} per layer; fix the model's config.json")
        return list(types)
    pattern = config.get("sliding_window_pattern")  # Gemma 3 configs before layer_types: every n-th layer is global
    if isinstance(pattern, int) and pattern > 0:
        return [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    if config.get("use_sliding_window") and "max_window_layers" in config:  # Qwen2 configs before layer_types
        return [SLIDING if i >= config["max_window_layers"] else FULL for i in range(layers)]
    return [SLIDING if config.get("sliding_window") else FULL] * layers  # Mistral, Phi-3: one window on every layer


def _windows(config: dict, types: list[str]) -> list[int | None]:
    """Keys a token sees per layer (itself included), or None for the whole context. A window at least the
    model's context changes nothing (Phi-3.5 and Phi-4-mini name one) and is not one."""
    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window") is False:  # Qwen2 and SmolLM3 name a window they switch off
        return [None] * len(types)
    if not isinstance(window, int) or window < 1:
        raise EdgeqError(f"sliding_window {window!r} is not a positive integer; fix the model's config.json")
    if window >= config.get("max_position_embeddings", 4096):
        return [None] * len(types)
    return [window if t == SLIDING else None for t in types]


def _ropes(config: dict, types: list[str]) -> list[Rope | None]:
    params = config.get("rope_parameters") or {}
    nested = isinstance(params, dict) and (FULL in params or SLIDING in params)
    full = Rope.from_config(config)
    if nested and params.get(SLIDING):
        local = Rope.from_params(params[SLIDING], config, config.get("rope_local_base_freq") or config.get("rope_theta"))
    elif config.get("rope_local_base_freq"):  # Gemma 3 configs before rope_parameters: default RoPE on local layers
        local = Rope(float(config["rope_local_base_freq"]))
    else:
        local = full
    ropes = [local if t == SLIDING else full for t in types]
    no_rope = config.get("no_rope_layers")  # SmolLM3: 1 = RoPE, 0 = none
    if no_rope is not None:
        if len(no_rope) != len(types):
            raise EdgeqError(f"no_rope_layers has {len(no_rope)} entries for {len(types)} layers; fix the model's config.json")
        ropes = [r if use else None for r, use in zip(ropes, no_rope)]
    return ropes


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int
    rope: Rope  # of the full-attention layers
    rotary_dim: int = 0  # leading dims of each head RoPE rotates (0: all of head_dim)
    windows: tuple = ()  # per layer: keys a token sees (itself included), None = all
    ropes: tuple = ()    # per layer: its Rope, None = no RoPE (NoPE)
    attention_scale: float = 0.0  # on q·k (0: 1/√head_dim)
    final_softcap: float | None = None  # tanh cap on the logits

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        params = config.get("rope_parameters") or {}
        partial = config.get("partial_rotary_factor") or (params.get("partial_rotary_factor") if isinstance(params, dict) else None) or 1.0
        rotary_dim = int(head_dim * partial)
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise EdgeqError(f"partial_rotary_factor {partial} rotates {rotary_dim} of {head_dim} dims, not an even count; fix the model's config.json")
        types = layer_types(config)
        scalar = config.get("query_pre_attn_scalar")
        return cls(
            layers=config["num_hidden_layers"], hidden=config["hidden_size"], heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
            max_positions=config.get("max_position_embeddings", 4096), rope=Rope.from_config(config),
            rotary_dim=rotary_dim, windows=tuple(_windows(config, types)), ropes=tuple(_ropes(config, types)),
            attention_scale=float(scalar) ** -0.5 if scalar else head_dim ** -0.5,
            final_softcap=config.get("final_logit_softcapping"),
        )

    def kv_bytes_per_token(self, element_bytes: float) -> int:
        """Keys and values one token adds to the cache, at `element_bytes` per element (the engine's dtype).
        Every layer counts, sliding ones too: edgeq's ONNX and Core ML caches hold the whole context per layer."""
        return round(2 * self.layers * self.kv_heads * self.head_dim * element_bytes)

    def kv_cache_bytes(self, context: int, element_bytes: float) -> int:
        return self.kv_bytes_per_token(element_bytes) * context

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    def rope_at(self, layer: int) -> Rope | None:
        return self.ropes[layer] if self.ropes else self.rope

    @property
    def sliding(self) -> bool:
        return any(w is not None for w in self.windows)

    @property
    def longrope(self) -> bool:
        return any(r is not None and r.kind == "longrope" for r in self.ropes)

    def uses_long_factors(self, context: int) -> bool:
        """LongRoPE's long factors for a sequence of `context` tokens (transformers: longer than the pretraining context)."""
        return self.longrope and context > self.rope.original_context

    def distinct_ropes(self) -> list[Rope]:
        """The different RoPEs of the layers, in first-use order: one cos/sin table each."""
        out: list[Rope] = []
        for rope in self.ropes or (self.rope,):
            if rope is not None and not any(rope is r for r in out):
                out.append(rope)
        return out

    def inv_freq(self, layer: int | None = None, long: bool = False) -> list[float]:
        """Inverse frequencies of `layer`'s RoPE (default: the full-attention layers'), `rotary_dim / 2` of them."""
        rope = self.rope if layer is None else self.rope_at(layer)
        if rope is None:
            raise EdgeqError(f"internal: layer {layer} has no RoPE")
        return rope.inv_freq(self.rotary_dim or self.head_dim, self.max_positions, long)
