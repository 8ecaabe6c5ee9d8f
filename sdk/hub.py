"""Models and adapters named as users name them: a local path, a Hugging Face hub id (`org/name`, at a
revision), or a hub repo of GGUF files with the file's type as a tag (`org/name:Q4_K_M`, as llama.cpp's `-hf`
and Ollama spell it).

A path that exists always wins, so a folder that happens to be called `org/name` is never shadowed by the hub.
A hub id is resolved by `huggingface_hub` itself, into its own cache: offline (`HF_HUB_OFFLINE=1`, or no
network) from that cache alone; online downloaded with a progress bar and the token huggingface_hub finds in
the usual places (`HF_TOKEN`, `hf auth login`). Only the files an export reads are fetched (config, tokenizer,
safetensors, templates), never a repo's other formats.
"""
from __future__ import annotations

import functools
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeqError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+?)(?::(?P<tag>[A-Za-z0-9_.-]+))?$")
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "README.md"]  # what intake and the card read
DEFAULT_GGUF_TAG = "Q4_K_M"  # llama.cpp's and Ollama's choice when a GGUF repo is named without a tag
PROBE_SECONDS = 3.0
_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


@dataclass(frozen=True)
class Resolved:
    """Where a model (or adapter) named by the user is on disk, and the hub coordinates it came from."""

    path: Path
    hub_id: str | None = None
    revision: str | None = None  # the commit the cache's snapshot holds
    gguf_file: str | None = None  # the file picked from a GGUF repo

    def origin(self) -> dict | None:
        if self.hub_id is None:
            return None
        return {"hub_id": self.hub_id, "revision": self.revision, **({"file": self.gguf_file} if self.gguf_file else {})}


def cache_folder() -> Path:
    """The hub cache huggingface_hub reads and writes (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub),
    read from the environment now: huggingface_hub reads it once, at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline_by_choice() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.upper() in ("1", "ON", "YES", "TRUE"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) and not value


@functools.cache
def hub_unreachable() -> bool:
    """No route to the hub (no network, no DNS): known in a few seconds, where huggingface_hub's own retries of a
    request take half a minute before it falls back to the cache."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=PROBE_SECONDS).close()
        return False
    except OSError:
        return True


def offline() -> bool:
    return offline_by_choice() or hub_unreachable()


def resolve(name: str | Path, *, revision: str | None = None, what: str = "model", progress: bool | None = None) -> Resolved:
    """`name` as a path when it exists (or is not a hub id), else as a hub id resolved into the hub cache."""
    path = Path(name).expanduser()
    match = HUB_ID.fullmatch(str(name))
    if path.exists() or match is None:
        if revision is not None:
            why = "which wins over the hub id of that name" if path.exists() else "not a hub id (org/name)"
            raise EdgeqError(f"--revision applies to a hub id, and {name} is a local path, {why}; drop --revision")
        return Resolved(path)
    repo, tag = match["repo"], match["tag"]
    try:
        files = _repo_files(repo, revision)
        if tag is None and "config.json" not in files and "adapter_config.json" not in files and _ggufs(files):
            tag = DEFAULT_GGUF_TAG if _pick_gguf(files, DEFAULT_GGUF_TAG, repo, strict=False) else None
            if tag is None:
                raise EdgeqError(f"{repo} holds GGUF files only ({', '.join(_gguf_types(files))}); pick one by its type, "
                                 f"e.g. {repo}:{_gguf_types(files)[0]}")
        if tag is not None:
            return _fetch_gguf(repo, tag, revision, files, progress)
        folder = _download(repo, revision, progress, allow_patterns=CHECKPOINT_FILES)
    except EdgeqError:
        raise
    except Exception as exc:  # huggingface_hub's errors, turned into one line that says what to do
        raise _hub_error(exc, repo, revision, what) from None
    return Resolved(folder, repo, folder.name)


def _repo_files(repo: str, revision: str | None) -> list[str]:
    """The repo's file names: from the hub when online, else from the cached snapshot (which must exist)."""
    if not offline():
        from huggingface_hub import HfApi

        try:
            return HfApi().list_repo_files(repo, revision=revision)
        except Exception as exc:
            if not _is_connection_error(exc):
                raise
    folder = _download(repo, revision, False, local_only=True)
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _download(repo: str, revision: str | None, progress: bool | None, allow_patterns=None, local_only: bool = False) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, cache_dir=cache_folder(), allow_patterns=allow_patterns,
                                  local_files_only=local_only or offline(), tqdm_class=_progress_class(progress)))


def _progress_class(progress: bool | None):
    """huggingface_hub's bars are switched off on the command line with every other library's (HF_HUB_DISABLE_PROGRESS_BARS,
    TQDM_DISABLE): a download is edgeq's own long step, so it gets edgeq's bar, on a terminal or when asked."""
    from tqdm.auto import tqdm

    class DownloadBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = None if progress is None else not progress
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)

    return DownloadBar


def _ggufs(files: list[str]) -> list[str]:
    return [f for f in files if f.lower().endswith(".gguf")]


def _gguf_types(files: list[str]) -> list[str]:
    """The quantization types a GGUF repo's file names spell (…-Q4_K_M.gguf), in the repo's order."""
    types = []
    for name in _ggufs(files):
        stem = _SPLIT.sub(".gguf", Path(name).name)[:-5]
        m = re.search(r"(?i)[-_.]((?:I?Q\d[A-Z0-9_]*)|F16|BF16|F32)$", stem)
        if m and m[1].upper() not in types:
            types.append(m[1].upper())
    return types or [Path(f).name for f in _ggufs(files)]


def _pick_gguf(files: list[str], tag: str, repo: str, strict: bool = True) -> str | None:
    """The one GGUF file of type `tag` (case-insensitive, as a whole part of the name); a model split into parts
    is refused (transformers reads one file)."""
    pattern = re.compile(rf"(?i)(^|[-_./]){re.escape(tag)}([-_.]|$)")
    matches = [f for f in _ggufs(files) if pattern.search(Path(f).name[:-5])]
    if not matches:
        if not strict:
            return None
        have = ", ".join(_gguf_types(files)) or "no GGUF files"
        raise EdgeqError(f"{repo} has no {tag} GGUF file (it has {have}); pick one of those types")
    whole = [f for f in matches if not _SPLIT.search(f)]
    if not whole:
        raise EdgeqError(f"{repo}'s {tag} GGUF is split into {len(matches)} parts, which edgeq cannot read as one file; "
                         "merge them with llama.cpp's llama-gguf-split --merge and pass the merged file")
    if len(whole) > 1 and strict:
        raise EdgeqError(f"{repo} has {len(whole)} {tag} GGUF files ({', '.join(whole)}); download the one you mean "
                         "and pass its path")
    return whole[0]


def _fetch_gguf(repo: str, tag: str, revision: str | None, files: list[str], progress: bool | None) -> Resolved:
    from huggingface_hub import hf_hub_download

    name = _pick_gguf(files, tag, repo)
    path = Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache_folder(), local_files_only=offline(),
                                tqdm_class=_progress_class(progress)))
    return Resolved(path, repo, path.parents[name.count("/")].name, name)  # …/snapshots/<commit>/<name>


def _is_connection_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectionError", "Timeout", "ConnectTimeout", "OfflineModeIsEnabled", "ConnectError", "TimeoutException"})


def _hub_error(exc: Exception, repo: str, revision: str | None, what: str) -> EdgeqError:
    kind = type(exc).__name__
    at = f" at revision {revision}" if revision else ""
    fetch = f"`hf download {repo}{f' --revision {revision}' if revision else ''}`"
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or _is_connection_error(exc):
        why = " (unset HF_HUB_OFFLINE)" if offline_by_choice() else " (the hub is unreachable from here)" if hub_unreachable() else ""
        how = f"fetch it online with {fetch}{why}"
        return EdgeqError(f"{what} {repo}{at} is not a local folder and not in the Hugging Face cache {cache_folder()}; {how}, "
                          "or pass the folder that holds it")
    if kind == "GatedRepoError":
        return EdgeqError(f"{what} {repo} is gated: accept its terms on huggingface.co/{repo}, then log in "
                          "(`hf auth login`, or set HF_TOKEN)")
    if kind == "RepositoryNotFoundError":
        return EdgeqError(f"{what} {repo} is not a local folder, and the hub has no repo {repo} you can see; check the "
                          "spelling, or log in (`hf auth login`, or set HF_TOKEN) if it is private")
    if kind == "RevisionNotFoundError":
        return EdgeqError(f"{what} {repo} has no revision {revision!r}; pass a branch, tag or commit it has (--revision)")
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else kind
    return EdgeqError(f"fetching {what} {repo}{at} from the Hugging Face hub failed ({detail}); retry, or fetch it with {fetch}")
