"""The KV cache type, chosen with the weights.

On a device whose memory binds (the weights at its preferred precision, plus the KV cache at its context,
do not fit), every byte the cache does not take is a byte the weights can have. Where the runtime can store
its cache quantized (llama.cpp: q8_0, q4_0), the plan is made once per cache type within what that type
leaves, and the type whose weights' predicted KL plus the cache's own measured KL (`edgeq.quant.kv_cache`,
at long context) is lowest wins. Where memory does not bind, a smaller cache buys the weights nothing, and
the runtime's default stays. The trade is kept in the plan, for `edgeq plan` to show.
"""
from __future__ import annotations

from .. import registry
from ..errors import EdgeqError
from ..model_shape import ModelShape
from .budget import budget_bytes, cached_context
from .kv_cache import check_cache_type, kv_error, supported
from .knapsack import Plan, plan_precisions


def plan_with_cache(sensitivity, source, fmt: str, calibration, profile, requested: str | None) -> Plan:
    """The plan on `profile` with its KV cache type: `requested` ("auto" or None: chosen, else that type)."""
    spec = registry.formats.get(fmt)
    if requested not in (None, "auto"):
        spec.kv_bytes_per_element(requested)  # an unknown type, or a format with one cache type: refused by name
    types = list(spec.kv_cache_types) if requested in (None, "auto") else [requested]
    if not types:
        return plan_precisions(sensitivity, budget_bytes(sensitivity, source.config, fmt, profile=profile))
    shape = ModelShape.from_config(source.config)
    if requested not in (None, "auto"):
        check_cache_type(requested, shape.head_dim)
    tiled = supported(types, shape.head_dim)
    context = cached_context(profile, source.config)
    budgets = {t: budget_bytes(sensitivity, source.config, fmt, profile=profile, kv_cache=t) for t in tiled}
    binds = len(set(budgets.values())) > 1
    quantized = [t for t in tiled if t != "f16"]
    errors = kv_error(calibration, quantized, context, source.config.get("max_position_embeddings") or context) \
        if quantized and (binds or requested not in (None, "auto")) else {}
    if not binds:
        tiled = tiled[:1]
    rows, refusal = [], None
    for cache_type in tiled:
        try:
            plan = plan_precisions(sensitivity, budgets[cache_type])
        except EdgeqError as exc:  # the weights do not fit beside this cache
            refusal = exc
            continue
        rows.append((plan, {"type": cache_type, "bytes": shape.kv_cache_bytes(context, spec.kv_cache_types[cache_type]),
                            "weights_budget": budgets[cache_type], "weights_kl": plan.predicted_kl,
                            "predicted_kl": errors.get(cache_type, 0.0)}))
    if not rows:
        raise refusal
    plan, chosen = min(rows, key=lambda row: row[0].predicted_kl + row[1]["predicted_kl"])
    plan.kv_cache = {**chosen, "context": context, "memory_binds": binds, "measured_tokens": errors.get("tokens"),
                     "trade": [row for _, row in rows] if binds else []}
    return plan
