"""ModelShape: the attention geometry and RoPE table every converter shares, checked against transformers."""
from __future__ import annotations

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.model_shape import ModelShape

BASE = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3, intermediate_size=512,
            vocab_size=1000, max_position_embeddings=8192, rope_theta=500000.0)
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
    "yarn-betas": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024, "beta_fast": 16, "beta_slow": 2},
}


def _transformers_rope(config: dict):
    """inv_freq and attention factor as transformers' own RoPE initialisation computes them."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(**config)
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    kind = params.get("rope_type", "default")
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        inv, scale = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
        return inv.double().numpy(), float(scale)
    inv, scale = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    return inv.double().numpy(), float(scale)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_rope_frequencies_equal_transformers(name):
    config = dict(BASE, rope_scaling=SCALINGS[name]) if SCALINGS[name] else dict(BASE)
    expected, attention = _transformers_rope(config)
    shape = ModelShape.from_config(config)
    np.testing.assert_allclose(np.array(shape.inv_freq()), expected, rtol=2e-6)
    assert shape.rope.attention_factor() == pytest.approx(attention, rel=1e-6)


def test_head_dim_and_kv_bytes_follow_the_config():
    shape = ModelShape.from_config(dict(BASE, head_dim=64))  # Qwen3 / Gemma name a head_dim that is not hidden/heads
    assert shape.head_dim == 64
    assert shape.kv_bytes_per_token(2) == 2 * 3 * 2 * 64 * 2
    assert shape.kv_cache_bytes(100, 4) == 2 * shape.kv_bytes_per_token(2) * 100
    assert ModelShape.from_config(BASE).head_dim == 32


@pytest.mark.parametrize("kind", ["dynamic", "made-up"])
def test_sequence_dependent_scalings_are_refused_by_name(kind):
    with pytest.raises(EdgeqError, match=kind):
        ModelShape.from_config(dict(BASE, rope_scaling={"rope_type": kind, "factor": 2.0}))


# Tiny configs of the families whose layers differ: (transformers class, config overrides)
TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GEMMA3 = dict(TINY, num_hidden_layers=3, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})
PHI4_MINI = dict(TINY, num_hidden_layers=2, partial_rotary_factor=0.75, original_max_position_embeddings=32,
                 rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5],
                               "long_factor": [2.0, 3.0, 5.0, 7.0, 11.0, 13.0]})
PHI3_4K = dict(TINY, num_hidden_layers=2, sliding_window=16)
SMOLLM3 = dict(TINY, num_hidden_layers=8)


def _hf(cls_name: str, config: dict):
    import torch
    import transformers

    cls = getattr(transformers, cls_name)
    hf = cls.config_class(**config)
    torch.manual_seed(0)
    return hf, cls(hf).eval()


def test_gemma3_local_and_global_layers_equal_transformers():
    hf, model = _hf("Gemma3ForCausalLM", GEMMA3)
    shape = ModelShape.from_config(hf.to_dict())
    rotary = model.model.rotary_emb
    for i, layer in enumerate(model.model.layers):
        assert shape.window(i) == layer.self_attn.sliding_window
        kind = hf.layer_types[i]
        np.testing.assert_allclose(shape.inv_freq(i), getattr(rotary, f"{kind}_inv_freq").double().numpy(), rtol=2e-6)
        assert shape.rope_at(i).attention_factor() == getattr(rotary, f"{kind}_attention_scaling")
        assert shape.attention_scale == pytest.approx(layer.self_attn.scaling)
    assert len(shape.distinct_ropes()) == 2
    # the pre-rope_parameters form of the same config (Gemma 3 as first published)
    legacy = {k: v for k, v in hf.to_dict().items() if k not in ("rope_parameters", "layer_types")}
    legacy.update(rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                  sliding_window_pattern=2, num_hidden_layers=3)
    old = ModelShape.from_config(legacy)
    assert old.windows == (8, None, 8)
    np.testing.assert_allclose(old.inv_freq(0), shape.inv_freq(0))
    np.testing.assert_allclose(old.inv_freq(1), shape.inv_freq(1))


@pytest.mark.parametrize("long", [False, True])
def test_phi4_partial_rotary_and_longrope_equal_transformers(long):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf, model = _hf("Phi3ForCausalLM", PHI4_MINI)
    shape = ModelShape.from_config(hf.to_dict())
    assert shape.rotary_dim == 12 and shape.rope.kind == "longrope"
    seq_len = 33 if long else 32  # transformers switches to the long factors past original_max_position_embeddings
    inv, scaling = ROPE_INIT_FUNCTIONS["longrope"](hf, "cpu", seq_len=seq_len)
    np.testing.assert_allclose(shape.inv_freq(0, long=shape.uses_long_factors(seq_len)), inv.double().numpy(), rtol=2e-6)
    assert shape.rope.attention_factor() == pytest.approx(model.model.rotary_emb.attention_scaling) == pytest.approx(scaling)
    assert shape.windows == (None, None)


def test_phi3_window_on_every_layer_and_smollm3_nope_layers_equal_transformers():
    hf, model = _hf("Phi3ForCausalLM", PHI3_4K)
    assert ModelShape.from_config(hf.to_dict()).windows == (16, 16) == (hf.sliding_window,) * 2
    hf, model = _hf("SmolLM3ForCausalLM", SMOLLM3)
    shape = ModelShape.from_config(hf.to_dict())
    assert [shape.rope_at(i) is not None for i in range(8)] == [bool(layer.self_attn.use_rope) for layer in model.model.layers]
    assert [i for i in range(8) if shape.rope_at(i) is None] == [3, 7]
    assert shape.windows == (None,) * 8  # SmolLM3 names a window it does not use


def test_qwen2_windows_from_max_window_layers_equal_transformers():
    from transformers import Qwen2Config

    config = dict(BASE, num_hidden_layers=4, sliding_window=64, use_sliding_window=True, max_window_layers=2)
    hf = Qwen2Config(**config)
    assert ModelShape.from_config(config).windows == tuple(64 if t == "sliding_attention" else None for t in hf.layer_types)
    assert ModelShape.from_config(config).windows == (None, None, 64, 64)


def test_a_window_as_long_as_the_context_is_no_window():
    assert ModelShape.from_config(dict(BASE, sliding_window=262144)).windows == (None,) * 3  # Phi-3.5 / Phi-4-mini
    assert ModelShape.from_config(dict(BASE, sliding_window=4096, use_sliding_window=False)).windows == (None,) * 3  # Qwen2


def test_longrope_factors_must_match_the_rotated_pairs():
    config = dict(PHI4_MINI, num_hidden_layers=2, rope_scaling={**PHI4_MINI["rope_scaling"], "short_factor": [1.0] * 5})
    with pytest.raises(EdgeqError, match="LongRoPE has 5 factors"):
        ModelShape.from_config(config).inv_freq(0)
