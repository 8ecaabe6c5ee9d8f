"""The KV cache as a plan prices it: what a quantized cache costs in quality, measured at long context.

A runtime that stores keys and values below 16 bits (llama.cpp's `type_k`/`type_v`) frees memory that a
device with little RAM and a long context can give to the weights instead. Whether that pays is a trade
the planner makes, so the cache's error is measured, not assumed: the float model runs one long window of
the calibration text with a cache that rounds every key and value to the type's grid as the runtime stores
them (blocks of 32 along each head's dimension, one float16 scale per block; keys after RoPE; and, as
llama.cpp does since its PR #21038 for heads a multiple of 64 wide, in a Walsh-Hadamard-rotated basis that
spreads outliers across each block), and the KL to the float cache's logits is the type's price. The error grows with the context, so the window is as
long as the device's context allows, at least `MIN_CONTEXT` tokens when the text and the model have them.

The price adds to the weights' predicted KL (the two errors are small and nearly independent);
`bench/kv_cache.py` checks it against llama.cpp's own quantized cache on the same tokens.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from ..errors import EdgeqError
from ..metrics import kl_rows
from ..model_shape import ModelShape
from .hadamard import sylvester

log = logging.getLogger(__name__)
MIN_CONTEXT = 2048
BLOCK = 32  # ggml's q8_0 and q4_0 block along each row of the cache
CACHE_VERSION = 1


def _rounded(x, cache_type: str):
    """`x` (…, head_dim) as the runtime's cache type holds it, back in x's dtype."""
    import torch

    if cache_type == "f16":
        return x.to(torch.float16).to(x.dtype)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK).float()
    if cache_type == "q8_0":  # d = max|x| / 127, codes round(x / d)
        d = blocks.abs().amax(-1, keepdim=True) / 127
        codes = torch.round(blocks / torch.where(d == 0, 1, d)).clamp(-127, 127)
    elif cache_type == "q4_0":  # d = (the signed value of largest magnitude) / -8, codes in 0..15 offset by 8
        d = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True)) / -8
        codes = torch.floor(blocks / torch.where(d == 0, 1, d) + 8.5).clamp(0, 15) - 8
    else:
        raise ValueError(f"no grid for KV cache type {cache_type!r}")
    d = d.to(torch.float16).float()  # the codes come from the exact scale; the block stores it as float16
    return (codes * d).reshape(x.shape).to(x.dtype)


def rotations(head_dim: int) -> tuple[int, int]:
    """The orders of llama.cpp's rotations of keys and values before a quantized cache stores them (0: none):
    keys by the largest power of two from 64 that divides the head, values by 64."""
    if head_dim % 64:
        return 0, 0
    keys = 64
    while head_dim % (keys * 2) == 0:
        keys *= 2
    return keys, 64


def _stored(x, cache_type: str, order: int):
    """`x` as the cache gives it back: rotated by the Hadamard of `order` (symmetric, its own inverse), rounded, rotated back."""
    import torch

    if not order or cache_type == "f16":
        return _rounded(x, cache_type)
    h = torch.from_numpy(sylvester(order) / order ** 0.5).to(x.dtype)
    chunks = x.reshape(*x.shape[:-1], x.shape[-1] // order, order)
    return (_rounded(chunks @ h, cache_type) @ h).reshape(x.shape)


def rounding_cache(config, cache_type: str, head_dim: int):
    """A transformers cache that stores keys and values as llama.cpp's `cache_type` holds them; attention reads them back."""
    from transformers import DynamicCache

    key_order, value_order = rotations(head_dim)

    class RoundingCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(_stored(key_states, cache_type, key_order), _stored(value_states, cache_type, value_order),
                                  layer_idx, *args, **kwargs)

    return RoundingCache(config=config)


def supported(cache_types, head_dim: int) -> list[str]:
    """The cache types whose blocks tile a head (llama.cpp refuses a quantized cache otherwise)."""
    return [t for t in cache_types if t == "f16" or head_dim % BLOCK == 0]


def check_cache_type(cache_type: str, head_dim: int) -> None:
    if not supported([cache_type], head_dim):
        raise EdgeqError(f"KV cache type {cache_type} stores blocks of {BLOCK} along each head, and this model's heads are "
                         f"{head_dim} wide; use --kv-cache f16")


def measure_kv_error(model, window: list[int], cache_types) -> dict[str, float]:
    """Mean KL (nats per token) of the float model's next-token distribution with each cache type, against
    its float cache, over one window of ids."""
    import torch

    ids = torch.tensor([window])
    with torch.no_grad():
        reference = torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)
        kl = {}
        for cache_type in cache_types:
            cache = rounding_cache(model.config, cache_type, ModelShape.from_config(model.config.to_dict()).head_dim)
            logits = model(ids, past_key_values=cache, use_cache=True).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            kl[cache_type] = max(float(kl_rows(reference, logp).mean()), 0.0)
    return kl


def kv_error(calibration, cache_types, context: int, trained_context: int) -> dict[str, float]:
    """Each cache type's KL on one calibration window of up to `context` tokens (cached per model, text and length)."""
    from ..default_model import cache_dir

    length = min(context, trained_context)
    if length < MIN_CONTEXT:
        log.info("the KV cache's error is measured over %d tokens, below the %d it is meant for: the context is that short", length, MIN_CONTEXT)
    settings = [CACHE_VERSION, calibration.source.fingerprint(), sorted(cache_types), length]
    digest = hashlib.sha256(json.dumps(settings).encode())
    digest.update(Path(calibration.text).read_bytes())
    file = cache_dir() / "sensitivity" / f"kv-{digest.hexdigest()[:24]}.json"
    if file.is_file():
        return json.loads(file.read_text())
    from .calibration import calibration_windows

    window = calibration_windows(calibration.source.chat_tokenizer(), calibration.text, length, length)[0]
    log.info("measuring the KV cache's error at %d tokens for %s", len(window), ", ".join(cache_types))
    kl = measure_kv_error(calibration.model, window, cache_types)
    kl["tokens"] = len(window)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(kl))
    return kl
