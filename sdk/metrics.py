"""The quality metrics, computed once for every caller: from log-probabilities or from greedy tokens.

`edgeq.quality` (eval and an export's check), `edgeq.quant.targets` (a plan simulated on the float model) and
`edgeq.adapter_quality` (kept adapters) all report these, so a number in a manifest means the same wherever
it came from.
"""
from __future__ import annotations

import numpy as np


def log_softmax(logits):
    """Log-probabilities of logits rows (numpy or torch); torch, vectorized and threaded: numpy takes ~1 s per
    256 × 49k window."""
    import torch

    if not isinstance(logits, torch.Tensor):
        logits = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    return torch.log_softmax(logits.float(), dim=-1)


def kl_rows(ref, cand):
    """KL(reference ‖ candidate) of each row of log-probabilities, in nats (float64)."""
    return (ref.exp() * (ref - cand)).sum(-1).double()


def finetune_metrics(noise, ref_top, cand_top, shift=None, base_top=None) -> dict:
    """What an export keeps of a fine-tune, from per-position arrays over the scored positions.

    `noise`: KL(fine-tune ‖ export) per position; `ref_top`/`cand_top`: each model's most likely token. With the
    base model's `base_top` and `shift` (KL(fine-tune ‖ base) per position): flip retention — at the positions
    where the fine-tune's top token differs from the base's, the share where the export still picks the
    fine-tune's — and noise-to-shift, the mean quantization noise over the mean change the fine-tune made.
    """
    noise, ref_top, cand_top = np.asarray(noise), np.asarray(ref_top), np.asarray(cand_top)
    out = {"kl": float(noise.mean()), "top1": float((ref_top == cand_top).mean())}
    if base_top is not None:
        flips = ref_top != np.asarray(base_top)
        out["flips"] = int(flips.sum())
        out["flip_retention"] = float((cand_top[flips] == ref_top[flips]).mean()) if flips.any() else None
    if shift is not None:
        shift_kl = float(np.mean(shift))
        out["shift_kl"] = shift_kl
        out["noise_to_shift"] = out["kl"] / shift_kl if shift_kl > 0 else None
    return out


def divergence(want: list[int], got: list[int]) -> int:
    """Tokens two greedy replies share before their first difference."""
    return next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))


def greedy_agreement(pairs: list[tuple[list[int], list[int]]], max_tokens: int) -> dict:
    """(reference, candidate) greedy replies to the same prompts: the share identical and the mean tokens
    until the first difference."""
    return {"replies": len(pairs), "exact_match": sum(want == got for want, got in pairs) / len(pairs),
            "tokens_to_divergence": float(np.mean([divergence(want, got) for want, got in pairs])), "max_tokens": max_tokens}


def greedy_pairs(reference_lm, candidate_lm, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Both models' greedy replies (token ids) to each prompt (token ids)."""
    return [(reference_lm.generate_ids(ids, max_tokens), candidate_lm.generate_ids(ids, max_tokens)) for ids in prompts]
