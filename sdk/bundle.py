"""The bundle: a folder with the model file(s), tokenizer, chat template and a versioned manifest.

A bundle is assembled in a hidden sibling folder and renamed into place only when complete, so a
failed or interrupted export (Ctrl-C included) leaves neither a bundle nor stray files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from . import __version__
from .errors import EdgeqError

MANIFEST = "edgeq.json"
MANIFEST_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _file_table(folder: Path) -> dict:
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        table[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def check_writable(out: Path, overwrite: bool = False) -> None:
    """Fails before any work if the bundle could not be written at `out`."""
    if out.exists() and not overwrite:
        raise EdgeqError(f"output {out} already exists; choose another -o or pass --overwrite")
    parent = out.parent if out.parent != Path("") else Path(".")
    if not parent.exists():
        raise EdgeqError(f"output folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise EdgeqError(f"output folder {parent} is not a folder; choose another -o")
    try:  # os.access says yes to root on read-only mounts; only a real write tells
        Path(tempfile.mkdtemp(prefix=".edgeq-probe-", dir=parent)).rmdir()
    except OSError as exc:
        raise EdgeqError(f"output folder {parent} is not writable ({exc.strerror}); choose another -o") from exc


@contextmanager
def staged_bundle(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty staging folder; on success it becomes `out` in one rename, on failure it vanishes."""
    out = Path(out)
    check_writable(out, overwrite)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
        if not (stage / MANIFEST).is_file():
            raise EdgeqError("internal: bundle staged without a manifest")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            stage.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Adds version, time and checksums of every file, then writes `edgeq.json`."""
    full = {
        "edgeq_manifest": MANIFEST_VERSION,
        "edgeq_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **manifest,
        "files": _file_table(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
    return full


def update_manifest(folder: Path, **fields) -> dict:
    """Rewrites top-level manifest fields (e.g. measured quality) without touching the files table."""
    manifest = read_manifest(folder, verify=False)
    manifest.update(fields)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(folder / MANIFEST)
    return manifest


def read_manifest(folder: Path, verify: bool = True) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise EdgeqError(f"{folder} is not an edgeq bundle (no {MANIFEST}); export one with `edgeq export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EdgeqError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-export the bundle") from exc
    version = manifest.get("edgeq_manifest")
    if version != MANIFEST_VERSION:
        raise EdgeqError(f"{path} has manifest version {version!r}; this edgeq reads version {MANIFEST_VERSION}: re-export or upgrade edgeq")
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise EdgeqError(f"bundle file {name} is missing from {folder}; re-export the bundle")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise EdgeqError(f"bundle file {name} does not match its checksum in {MANIFEST} (changed or corrupt); re-export the bundle")
