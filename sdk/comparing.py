"""`edgeq.compare()`: several bundles of one fine-tune side by side — size, quality on its own data, decode speed.

The speed comes from `edgeq.profile()` (each bundle in a fresh process) and the quality from `edgeq.evaluate()`
on the eval data, so the table and the chart are `edgeq profile`'s, with the fine-tune's metrics added.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .profile_report import ProfileResult


def compare(bundles: Sequence[str | Path], *, eval_data: str | Path, base: str | Path | None = None, tokens: int = 2048,
            gen: int = 64, repeat: int = 3, threads: int | None = None, progress: bool | None = None) -> ProfileResult:
    """Profiles each bundle and judges it on `eval_data` (assistant tokens of JSONL chats, or text); with the
    base model (`base=`, or the model under the bundles' adapter) also flip retention and noise-to-shift.
    The chart's colour is the KL on the eval data."""
    from .profiling import profile
    from .quality import evaluate

    result = profile(list(bundles), prompt_tokens=(64,), gen=gen, repeat=repeat, threads=threads, progress=progress)
    for b in result.bundles:
        quality = evaluate(b.path, eval_data=eval_data, base=base, tokens=tokens, threads=threads, progress=progress)
        b.finetune = quality.to_dict()
        b.kl = quality.kl
    result.quality_label = f"KL vs the fine-tune on {Path(eval_data).name} (assistant tokens)"
    return result
