"""How many bytes of weights a plan may spend: an explicit size or bits per weight, else what the device implies."""
from __future__ import annotations

import logging
import math

from .. import registry
from ..errors import EdgeqError
from ..model_shape import ModelShape
from ..validate import parse_size

log = logging.getLogger(__name__)
RUNTIME_OVERHEAD = 64 << 20  # compute buffers and the runtime itself, beside weights and KV cache


def budget_bytes(sensitivity, config: dict, fmt: str, *, profile=None, size=None, bits_per_weight=None, kv_cache=None) -> int:
    """The byte budget for the weights. A device's is the smaller of its memory (less the KV cache at its
    context, in `kv_cache`'s type or the runtime's default, and the runtime) and the size of its preferred
    precision for this format."""
    weights = sum(math.prod(t["shape"]) for t in sensitivity.tensors.values())
    if size is not None:
        return parse_size(size)
    if bits_per_weight is not None:
        return int(weights * float(bits_per_weight) / 8) + sensitivity.fixed_bytes
    if profile is None:
        raise EdgeqError("planning needs a budget: pass --device, --size or --bits-per-weight")
    spec = registry.formats.get(fmt)
    kv = ModelShape.from_config(config).kv_cache_bytes(cached_context(profile, config), spec.kv_bytes_per_element(kv_cache))
    memory = profile.budget_bytes - kv - RUNTIME_OVERHEAD
    preferred = (profile.precisions.get(fmt) or (spec.default_precision,))[0]
    target = int(weights * spec.nominal_bpw[spec.normalize(preferred)] / 8) + sensitivity.fixed_bytes
    if memory < target:
        log.info("device memory budget %.0f MiB is below the %s size; planning for memory", memory / 2**20, preferred)
    return min(memory, target)


def cached_context(profile, config: dict) -> int:
    """Tokens the runtime's cache holds on the device: its context, within what the model was trained for."""
    return min(profile.context_length, config.get("max_position_embeddings") or profile.context_length)
