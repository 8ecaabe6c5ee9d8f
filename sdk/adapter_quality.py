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
from typing import Sequence

import numpy as np

from . import registry
from .errors import EdgeqError
from .quality import DEFAULT_TEXT, BaseScores, compare, finetune_quality
from .quant.calibration import calibration_windows

CONTINUATIONS = 8        # built-in sample: greedy continuations compared per adapter
PROMPT_TOKENS = 32       # … each from this many tokens of a window
CONTINUATION_TOKENS = 32


class PinnedAdapter:
    """An engine seen with one adapter always on, for code that runs engines without naming adapters (quality
    measurement): it has no `adapters` of its own, so a `LanguageModel` over it never switches."""

    def __init__(self, engine, name: str | None):
        engine.set_adapter(name)
        self.engine = engine

    def __getattr__(self, attr):
        if attr in ("adapters", "adapter", "set_adapter"):
            raise AttributeError(attr)
        return getattr(self.engine, attr)

    @property
    def tokens(self) -> list[int]:
        return self.engine.tokens

    def forward(self, tokens: Sequence[int]) -> np.ndarray:
        return self.engine.forward(tokens)

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        return self.engine.score(tokens)


def continuation_agreement(reference, candidate, tokenizer, windows: list[list[int]]) -> dict:
    """Greedy continuations of the windows' first tokens, candidate vs reference: share identical and mean tokens
    until the first difference."""
    from .generate import LanguageModel

    ref_lm, cand_lm = LanguageModel(reference, tokenizer), LanguageModel(candidate, tokenizer)
    exact, until = 0, []
    prompts = [w[:PROMPT_TOKENS] for w in windows[:CONTINUATIONS]]
    for prompt in prompts:
        want = ref_lm.generate_ids(prompt, CONTINUATION_TOKENS)
        got = cand_lm.generate_ids(prompt, CONTINUATION_TOKENS)
        exact += want == got
        until.append(next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got))))
    return {"replies": len(prompts), "exact_match": exact / len(prompts), "tokens_to_divergence": float(np.mean(until)),
            "max_tokens": CONTINUATION_TOKENS}


def measure_one(reference, candidate, tokenizer, *, data=None, base: BaseScores | None = None, windows=None,
                progress: bool | None = None) -> dict:
    """`candidate` (an engine already running the adapter) against the float merged `reference`."""
    if data is not None:
        return finetune_quality(reference, candidate, data, tokenizer=tokenizer, base=base, progress=progress).to_dict()
    quality = compare(reference, candidate, windows, progress, text="built-in sample").to_dict()
    return {**quality, "agreement": continuation_agreement(reference, candidate, tokenizer, windows)}


def _reference(base_path: Path, adapter_path: Path, trust_pickle: bool = False):
    from .intake import open_model

    return registry.runtimes.get(registry.REFERENCE_RUNTIME)(open_model(base_path, adapter=adapter_path, trust_pickle=trust_pickle))


def _merged_bundle(job, adapter, folder: Path):
    """The adapter merged into the float base and converted like the bundle's base (same precision or plan)."""
    from .intake import open_model
    from .loading import open_engine
    from .quant.calibration import Calibration

    merged = open_model(job.source.path, adapter=adapter.path, trust_pickle=job.source.trust_pickle)
    if job.source.untied_head:
        merged.untie_head()  # the bundle's plan (or overrides) names the head as a tensor of its own
    calibration = Calibration(merged, job.calibration.text if job.calibration.given else None, job.calibration.tokens)
    try:
        fields = job.spec.converter().convert(merged, folder, precision=job.precision, overrides=job.overrides,
                                              calibration=calibration, progress=job.progress, **job.options)
    finally:
        if calibration.loaded_engine is not None:
            calibration.loaded_engine.close()
    return open_engine(folder, {**job.manifest, **fields, "adapters": []}, job.spec.eval_runtime)


def measure_kept(job, stage: Path) -> None:
    """Each adapter of the staged bundle against its float merged model, separate (and merged, when asked); written
    into the job's manifest entry of the adapter."""
    from .eval_data import read_dataset
    from .loading import open_engine

    tokenizer = job.source.chat_tokenizer()
    windows = calibration_windows(tokenizer, DEFAULT_TEXT, job.eval_tokens or 1024, job.eval_ctx)
    entries = {entry["name"]: entry for entry in job.manifest["adapters"]}
    candidate = open_engine(stage, job.manifest, job.spec.eval_runtime)
    workdir = Path(tempfile.mkdtemp(prefix="edgeq-adapters-"))
    try:
        for adapter in job.adapters:
            data = base = None
            if adapter.name in job.adapter_data:
                data = read_dataset(job.adapter_data[adapter.name], tokenizer, tokens=job.eval_data_tokens, ctx=job.eval_ctx * 4)
                base = BaseScores(job.calibration.engine, data, workdir, job.progress)  # the base is the model before the fine-tune
            reference = _reference(job.source.path, adapter.path, job.source.trust_pickle)
            try:
                entry = entries[adapter.name]
                entry["quality"] = measure_one(reference, PinnedAdapter(candidate, adapter.name), tokenizer, data=data, base=base,
                                               windows=windows, progress=job.progress)
                if job.compare_merged:
                    folder = workdir / f"merged-{adapter.name}"
                    folder.mkdir()
                    merged = _merged_bundle(job, adapter, folder)
                    try:
                        entry["merged_quality"] = measure_one(reference, merged, tokenizer, data=data, base=base, windows=windows,
                                                              progress=job.progress)
                    finally:
                        merged.close()
                        shutil.rmtree(folder, ignore_errors=True)
            finally:
                reference.close()
    finally:
        candidate.set_adapter(None)
        candidate.close()
        shutil.rmtree(workdir, ignore_errors=True)


def check_adapter_data(adapter_data: dict | None, names: list[str]) -> dict[str, Path]:
    """Per-adapter eval data: every name must be one of the kept adapters."""
    checked = {}
    for name, path in (adapter_data or {}).items():
        if name not in names:
            raise EdgeqError(f"eval data is given for adapter {name!r}, which is not among the kept adapters ({', '.join(names) or 'none'})")
        checked[name] = Path(path)
    return checked
