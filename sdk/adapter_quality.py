"""How much of each kept adapter survives in a bundle, both ways it could ship.

- separate: the float adapter switched on over the bundle's (quantized) base, at run time;
- merged (with `compare_merged`): the adapter merged into the float base, then quantized at the same precision
  (or plan), the way a merged export ships it.

Both are measured against the float merged model (the fine-tune as trained), on the adapter's own data when
given (KL and top-1 on its assistant tokens, greedy-reply agreement, flip retention against the base) and on the
built-in sample otherwise (KL, top-1, and greedy continuations of its windows). The numbers land in the
manifest beside each adapter, so `edgeq inspect` shows which way keeps more of that fine-tune.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .engine import PinnedAdapter
from .errors import EdgeqError
from .metrics import greedy_agreement, greedy_pairs
from .quality import BaseScores, compare, finetune_quality

CONTINUATIONS = 8        # built-in sample: greedy continuations compared per adapter
PROMPT_TOKENS = 32       # … each from this many tokens of a window
CONTINUATION_TOKENS = 32


def continuation_agreement(reference, candidate, tokenizer, windows: list[list[int]]) -> dict:
    """Greedy continuations of the windows' first tokens, candidate vs reference."""
    from .generate import LanguageModel

    prompts = [w[:PROMPT_TOKENS] for w in windows[:CONTINUATIONS]]
    pairs = greedy_pairs(LanguageModel(reference, tokenizer), LanguageModel(candidate, tokenizer), prompts, CONTINUATION_TOKENS)
    return greedy_agreement(pairs, CONTINUATION_TOKENS)


def measure_one(reference, candidate, tokenizer, *, data=None, base: BaseScores | None = None, windows=None,
                progress: bool | None = None) -> dict:
    """`candidate` (an engine already running the adapter) against the float merged `reference`."""
    if data is not None:
        return finetune_quality(reference, candidate, data, tokenizer=tokenizer, base=base, progress=progress).to_dict()
    quality = compare(reference, candidate, windows, progress, text="built-in sample").to_dict()
    return {**quality, "agreement": continuation_agreement(reference, candidate, tokenizer, windows)}


def measure_kept(candidate, adapters, tokenizer, *, reference_for: Callable, merged_for: Callable | None = None,
                 data_for: dict | None = None, base_engine=None, windows=None, progress: bool | None = None) -> dict[str, dict]:
    """Each kept adapter switched on over `candidate` (the bundle's engine, which holds them all) against its float
    merged model, which `reference_for(adapter)` opens; with `merged_for(adapter, folder)` (an engine over the adapter
    merged into the float base, then converted into `folder` like the bundle's base), that way too. An adapter's
    data (`data_for[name]`, an `edgeq.eval_data.Dataset`) is scored against `base_engine`, the model before the
    fine-tune, as well. Returns adapter name → {"quality", and "merged_quality" with `merged_for`}."""
    data_for = data_for or {}
    records: dict[str, dict] = {}
    workdir = Path(tempfile.mkdtemp(prefix="edgeq-adapters-"))
    try:
        for adapter in adapters:
            data = data_for.get(adapter.name)
            base = BaseScores(base_engine, data, workdir, progress) if data is not None and base_engine is not None else None
            reference = reference_for(adapter)
            try:
                record = records[adapter.name] = {}
                record["quality"] = measure_one(reference, PinnedAdapter(candidate, adapter.name), tokenizer, data=data, base=base,
                                                windows=windows, progress=progress)
                if merged_for is not None:
                    folder = workdir / f"merged-{adapter.name}"
                    folder.mkdir()
                    merged = merged_for(adapter, folder)
                    try:
                        record["merged_quality"] = measure_one(reference, merged, tokenizer, data=data, base=base, windows=windows,
                                                               progress=progress)
                    finally:
                        merged.close()
                        shutil.rmtree(folder, ignore_errors=True)
            finally:
                reference.close()
    finally:
        candidate.set_adapter(None)
        shutil.rmtree(workdir, ignore_errors=True)
    return records


def check_adapter_data(adapter_data: dict | None, names: list[str]) -> dict[str, Path]:
    """Per-adapter eval data: every name must be one of the kept adapters."""
    checked = {}
    for name, path in (adapter_data or {}).items():
        if name not in names:
            raise EdgeqError(f"eval data is given for adapter {name!r}, which is not among the kept adapters ({', '.join(names) or 'none'})")
        checked[name] = Path(path)
    return checked
