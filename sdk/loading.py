"""`edgeq.load()`: a bundle (backend chosen from its manifest) or an HF folder (torch reference)."""
from __future__ import annotations

from pathlib import Path

from . import registry
from .bundle import MANIFEST, TEMPLATE_FILE, read_manifest
from .engine import default_threads
from .errors import EdgeqError
from .generate import LanguageModel
from .speculation import DEFAULT_DRAFT_TOKENS, Speculation
from .speculative import LOOKUP, DraftModel, LookupDrafter, check_draft_tokens
from .tokenizer import ChatTokenizer, TokenizerSpec
from .validate import check_engine_args



def bundle_tokenizer(folder: Path, manifest: dict) -> ChatTokenizer:
    template = folder / TEMPLATE_FILE
    return ChatTokenizer(
        folder / "tokenizer.json",
        TokenizerSpec.from_dict(manifest["tokenizer"]),
        template.read_text() if template.is_file() else None,
    )


def open_engine(folder: Path, manifest: dict, backend: str | None = None, threads: int | None = None, n_ctx: int | None = None):
    """The bundle's engine; threads default to the device profile's (capped by this machine's cores) on every engine."""
    engine_cls = registry.runtimes.get(backend or manifest["runtime"])
    return engine_cls.open(folder / manifest["model_file"], manifest, threads=threads or default_threads(manifest),
                           n_ctx=n_ctx or manifest.get("context_length"))


def load(path: str | Path, *, backend: str | None = None, threads: int | None = None, n_ctx: int | None = None,
         adapter: str | Path | None = None, adapters: dict | None = None, verify: bool = True, draft: str | Path | None = None,
         draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> LanguageModel:
    """Loads a bundle made by `edgeq export`, or a Hugging Face folder (with `adapter=`) as the torch reference.

    A Hugging Face folder with `adapters={name: dir}` runs in torch with the PEFT adapters kept apart:
    `generate(..., adapter=name)` switches between them (None: the base).

    `backend` overrides the runtime the manifest names; `threads` and `n_ctx` default to the
    device profile the bundle was made for. Loading a bundle verifies its checksums.

    `draft` turns on speculative decoding: "lookup" (n-grams of the prompt and the reply so far) or a smaller
    bundle (or HF folder) with the same tokenizer, in any format; at most `draft_tokens` tokens are guessed per pass.
    """
    check_engine_args(threads, n_ctx)
    check_draft_tokens(draft_tokens)
    model = _load(Path(path), backend, threads, n_ctx, adapter, adapters, verify)
    if draft is not None:
        try:
            model.speculation = Speculation(_drafter(draft, model, threads, verify), draft_tokens)
            model.speculation.calibrate(model.engine)
        except BaseException:
            model.close()
            raise
    return model


def _drafter(draft: str | Path, target: LanguageModel, threads: int | None, verify: bool):
    if str(draft) == LOOKUP:
        return LookupDrafter()
    small = load(draft, threads=threads, verify=verify)
    try:
        return DraftModel(small, target)
    except BaseException:
        small.close()
        raise


def _load(path: Path, backend, threads, n_ctx, adapter, adapters, verify) -> LanguageModel:
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path, verify=verify)
        return LanguageModel(open_engine(path, manifest, backend, threads, n_ctx), bundle_tokenizer(path, manifest), manifest, path)
    if (path / "config.json").is_file():
        from .intake import open_model

        source = open_model(path, adapter=adapter)
        kept = {}
        if adapters:
            from .adapter_set import open_adapters

            if adapter is not None:
                raise EdgeqError("pass adapter= (merged) or adapters= (kept apart), not both")
            kept = {a.name: a.path for a in open_adapters(source, adapters, None)}
        engine = registry.runtimes.get(backend or registry.REFERENCE_RUNTIME)(source, threads=threads or default_threads(), n_ctx=n_ctx,
                                                                              **({"adapters": kept} if kept else {}))
        return LanguageModel(engine, source.chat_tokenizer(), {"format": "hf", "runtime": "torch"}, path)
    raise EdgeqError(f"{path} is neither an edgeq bundle ({MANIFEST}) nor a Hugging Face folder (config.json)")
