"""`edgeq.load()`: a bundle (backend chosen from its manifest) or an HF folder (torch reference)."""
from __future__ import annotations

from pathlib import Path

from . import registry
from .bundle import MANIFEST, read_manifest
from .errors import EdgeqError
from .generate import LanguageModel
from .tokenizer import ChatTokenizer, TokenizerSpec

from .validate import check_engine_args
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def bundle_tokenizer(folder: Path, manifest: dict) -> ChatTokenizer:
    template = folder / CHAT_TEMPLATE_FILE
    return ChatTokenizer(
        folder / "tokenizer.json",
        TokenizerSpec.from_dict(manifest["tokenizer"]),
        template.read_text() if template.is_file() else None,
    )


def open_engine(folder: Path, manifest: dict, backend: str | None = None, threads: int | None = None, n_ctx: int | None = None):
    engine_cls = registry.runtimes.get(backend or manifest["runtime"])
    return engine_cls.open(folder / manifest["model_file"], manifest, threads=threads, n_ctx=n_ctx or manifest.get("context_length"))


def load(path: str | Path, *, backend: str | None = None, threads: int | None = None, n_ctx: int | None = None,
         adapter: str | Path | None = None, verify: bool = True) -> LanguageModel:
    """Loads a bundle made by `edgeq export`, or a Hugging Face folder (with `adapter=`) as the torch reference.

    `backend` overrides the runtime the manifest names; `threads` and `n_ctx` default to the
    device profile the bundle was made for. Loading a bundle verifies its checksums.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path, verify=verify)
        return LanguageModel(open_engine(path, manifest, backend, threads, n_ctx), bundle_tokenizer(path, manifest), manifest, path)
    if (path / "config.json").is_file():
        from .intake import open_model
    check_engine_args(threads, n_ctx)

        source = open_model(path, adapter=adapter)
        engine = registry.runtimes.get(backend or "torch")(source, threads=threads, n_ctx=n_ctx)
        return LanguageModel(engine, source.chat_tokenizer(), {"format": "hf", "runtime": "torch"}, path)
    raise EdgeqError(f"{path} is neither an edgeq bundle ({MANIFEST}) nor a Hugging Face folder (config.json)")
