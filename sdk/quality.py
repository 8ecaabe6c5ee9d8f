"""Quality against the torch reference on the same tokens: mean KL divergence, top-1 agreement, perplexity.

`evaluate()` is the public verb (`edgeq eval`); `compare()` is what export and eval share.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import registry
from .engine import Engine, PinnedAdapter
from .errors import EdgeqError
from .metrics import finetune_metrics, greedy_agreement, greedy_pairs, kl_rows, log_softmax
from .progress import bar

DEFAULT_TEXT = Path(__file__).with_name("eval_text.txt")


@dataclass
class Quality:
    kl: float          # mean KL(reference ‖ candidate) per position, nats
    top1: float        # share of positions where both pick the same most likely token
    ppl: float         # candidate perplexity on the text
    ppl_ref: float     # reference perplexity on the same tokens
    tokens: int
    ctx: int
    text: str = ""

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class QualityAccumulator:
    """Sums per-position statistics over windows; `result()` averages them."""

    def __init__(self):
        self.kl = self.agree = self.nll = self.nll_ref = 0.0
        self.positions = self.predicted = 0

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, window: list[int]) -> None:
        ref, cand = log_softmax(ref_logits), log_softmax(logits)
        self.kl += float(kl_rows(ref, cand).sum())
        self.agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        self.positions += len(window)
        targets = window[1:]
        rows = list(range(len(targets)))
        self.nll -= float(cand[rows, targets].sum())
        self.nll_ref -= float(ref[rows, targets].sum())
        self.predicted += len(targets)

    def result(self, ctx: int, text: str = "") -> Quality:
        return Quality(
            kl=self.kl / self.positions, top1=self.agree / self.positions,
            ppl=float(np.exp(self.nll / self.predicted)), ppl_ref=float(np.exp(self.nll_ref / self.predicted)),
            tokens=self.positions, ctx=ctx, text=text,
        )


def compare(reference: Engine, candidate: Engine, windows: list[list[int]], progress: bool | None = None, text: str = "") -> Quality:
    acc = QualityAccumulator()
    with bar(len(windows), "eval", "window", progress) as pbar:
        for window in windows:
            acc.add(reference.score(window), candidate.score(window), window)
            pbar.update(1)
    return acc.result(ctx=len(windows[0]), text=text)


def evaluate(bundle: str | Path, *, text: str | Path | None = None, tokens: int = 4096, ctx: int = 512,
             eval_data: str | Path | None = None, base: str | Path | None = None,
             reference: str | Path | None = None, backend: str | None = None, threads: int | None = None,
             adapter: str | None = None, progress: bool | None = None) -> "Quality | FinetuneQuality":
    """Measures a bundle against the torch reference on the same tokens.

    On text (default: a built-in sample): KL, top-1, perplexity. On `eval_data` (JSONL chats or
    prompt/completion, or text): the fine-tune metrics of `FinetuneQuality` on the assistant tokens, with
    retention when the base model is known (`base=`, else the model under the bundle's adapter). The
    reference is the source model the manifest names (with its adapter), or `reference=`. Without
    `backend`, the format may name the runtime that measures it here (Core ML off macOS: the package's
    weights in torch); else the manifest's runtime. `adapter` names one of the bundle's kept LoRA adapters: it is
    switched on over the bundle's base and measured against the float model with that adapter merged.
    """
    import tempfile

    from .bundle import read_manifest
    from .intake import open_base, open_model
    from .loading import bundle_tokenizer, open_engine
    from .quant.calibration import calibration_windows

    from .validate import CONTEXT, TOKENS, check_engine_args

    check_engine_args(threads, None)
    CONTEXT.check("ctx", ctx)
    TOKENS.check("tokens", tokens)
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    src = manifest.get("source") or {}
    ref_path = Path(reference) if reference else Path(src.get("path", ""))
    gguf = Path((src.get("gguf_file") or {}).get("file", ""))
    if not reference and not (ref_path / "config.json").is_file() and gguf.suffix and gguf.is_file():
        ref_path = gguf  # exported from a GGUF whose dequantized copy left the cache: made again from the file
    elif not reference and not (ref_path / "config.json").is_file():
        raise EdgeqError(f"the reference model {ref_path} is not there; pass --reference with the source model folder")
    merged = None if reference else (src.get("adapter") or {}).get("path")
    if adapter is not None:
        kept = {entry["name"]: entry for entry in manifest.get("adapters") or []}
        if adapter not in kept:
            raise EdgeqError(f"{bundle} has no adapter {adapter!r}; it has {', '.join(map(repr, kept)) or 'none'}")
        merged = kept[adapter]["path"]
    source = open_model(ref_path, adapter=merged)
    tokenizer = bundle_tokenizer(bundle, manifest)
    runtime = registry.runtimes.get(registry.REFERENCE_RUNTIME)
    with tempfile.TemporaryDirectory(prefix="edgeq-eval-") as tmp:
        data = base_scores = None
        if eval_data is not None:
            from .eval_data import read_dataset

            data = read_dataset(eval_data, tokenizer, tokens=tokens, ctx=min(ctx * 2, manifest.get("context_length") or ctx * 2))
            base_source = open_base(source, base)
            if base_source is not None:  # scored first: the two float models are never loaded together
                engine = runtime(base_source, threads=threads)
                try:
                    base_scores = BaseScores(engine, data, Path(tmp), progress)
                finally:
                    engine.close()
        elif base is not None:
            raise EdgeqError("--base measures retention on --eval-data; pass --eval-data too")
        reference_engine = runtime(source, threads=threads)
        backend = backend or registry.formats.get(manifest["format"]).eval_runtime
        candidate = open_engine(bundle, manifest, backend, threads, n_ctx=max(ctx * 2, manifest.get("context_length") or 0))
        if adapter is not None:
            candidate = PinnedAdapter(candidate, adapter)
        try:
            if data is not None:
                return finetune_quality(reference_engine, candidate, data, tokenizer=tokenizer, base=base_scores, progress=progress)
            windows = calibration_windows(tokenizer, Path(text) if text else DEFAULT_TEXT, tokens, ctx)
            return compare(reference_engine, candidate, windows, progress, text=str(text) if text else "built-in sample")
        finally:
            candidate.close()


@dataclass
class FinetuneQuality:
    """How much of a fine-tune an export keeps, on the fine-tune's own data (assistant tokens only).

    kl, top1: KL(fine-tune ‖ export) and top-1 agreement over the positions that predict an assistant token.
    agreement: greedy replies to the data's prompts, export vs fine-tune: share identical (exact_match),
        mean tokens until the first difference (tokens_to_divergence), chrF of the export's reply against
        the fine-tune's (0-100).
    flip_retention: at the positions where the fine-tune's top-1 token differs from its base model's, the
        share where the export's top-1 is still the fine-tune's (None without a base, or with no such position).
    noise_to_shift: mean KL(fine-tune ‖ export) ÷ mean KL(fine-tune ‖ base) on the same positions: how large
        the quantization noise is against what the fine-tune changed (None without a base).
    """

    kl: float
    top1: float
    tokens: int
    agreement: dict
    flip_retention: float | None = None
    noise_to_shift: float | None = None
    flips: int | None = None
    shift_kl: float | None = None
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class BaseScores:
    """The pre-fine-tune model's log-probabilities at the data's scored positions, kept on disk.

    Scored before the fine-tune's reference is loaded, so the two float models are never in memory at once.
    """

    def __init__(self, engine: Engine, data, folder: Path, progress: bool | None = None):
        rows = data.scored_tokens
        self.logprobs = np.lib.format.open_memmap(Path(folder) / "base-logprobs.npy", mode="w+", dtype=np.float32,
                                                  shape=(rows, engine.n_vocab))
        row = 0
        with bar(len(data.samples), "eval: base model", "sample", progress) as pbar:
            for sample in data.samples:
                base = _scored(engine, sample)
                self.logprobs[row:row + base.shape[0]] = base.numpy()
                row += base.shape[0]
                pbar.update(1)
        self.top = np.asarray(self.logprobs.argmax(-1))


def _scored(engine: Engine, sample):
    import torch

    return log_softmax(engine.score(sample.ids))[torch.from_numpy(np.append(sample.targets, False))]


def finetune_quality(reference: Engine, candidate: Engine, data, *, tokenizer, base: BaseScores | None = None,
                     replies: int = 16, reply_tokens: int = 48, progress: bool | None = None) -> FinetuneQuality:
    """Scores `candidate` against the fine-tune `reference` on `data` (`edgeq.eval_data.Dataset`), and against
    what the fine-tune changed when the base model's scores are given."""
    import torch

    scored = data.scored_tokens
    ref_top, cand_top = np.empty(scored, dtype=np.int64), np.empty(scored, dtype=np.int64)
    noise, shift = np.empty(scored), np.empty(scored)
    row = 0
    with bar(len(data.samples), "eval: fine-tune data", "sample", progress) as pbar:
        for sample in data.samples:
            ref, cand = _scored(reference, sample), _scored(candidate, sample)
            n = ref.shape[0]
            noise[row:row + n] = kl_rows(ref, cand).numpy()
            if base is not None:
                shift[row:row + n] = kl_rows(ref, torch.from_numpy(np.asarray(base.logprobs[row:row + n]))).numpy()
            ref_top[row:row + n], cand_top[row:row + n] = ref.argmax(-1).numpy(), cand.argmax(-1).numpy()
            row += n
            pbar.update(1)
    metrics = finetune_metrics(noise, ref_top, cand_top, *((shift, base.top) if base is not None else ()))
    return FinetuneQuality(**metrics, tokens=scored, data=data.describe(),
                           agreement=reply_agreement(reference, candidate, tokenizer, data, replies, reply_tokens))


def reply_agreement(reference: Engine, candidate: Engine, tokenizer, data, replies: int, reply_tokens: int) -> dict:
    """Greedy replies of both models to the data's first `replies` prompts (chats only)."""
    from sacrebleu.metrics import CHRF

    from .generate import LanguageModel

    prompts = [s.prompt for s in data.samples if s.prompt][:replies]
    if not prompts:
        return {}
    pairs = greedy_pairs(LanguageModel(reference, tokenizer), LanguageModel(candidate, tokenizer),
                         [tokenizer.encode_chat(messages) for messages in prompts], reply_tokens)
    refs = [tokenizer.decode(want, skip_special_tokens=True) for want, _ in pairs]
    hyps = [tokenizer.decode(got, skip_special_tokens=True) for _, got in pairs]
    agreement = greedy_agreement(pairs, reply_tokens)
    return {**agreement, "chrf": round(CHRF().corpus_score(hyps, [refs]).score, 3), "max_tokens": reply_tokens}
