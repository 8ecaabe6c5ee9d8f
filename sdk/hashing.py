"""Content hashes: bundle checksums, source fingerprints and cache keys all stream files the same way."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

CHUNK = 1 << 22


def sha256_files(paths: Iterable[Path], digest=None) -> str:
    """One SHA-256 over the files' bytes in order (a multi-file checkpoint hashes as its concatenation)."""
    digest = digest or hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return sha256_files([path])


def checkpoint_digest(paths: list[Path]) -> str:
    """`sha256_files` of a checkpoint's weight files, remembered in edgeq's cache under the files' identities (device,
    inode, size, modification time in ns), as git's index and make trust them: a multi-GB checkpoint is read once,
    not again on every plan and export of it. A file rewritten in place gets a new modification time and so a new
    hash; the bytes themselves are never compared."""
    from .default_model import cache_dir

    stats = [(str(Path(p).resolve()), *(getattr(os.stat(p), f) for f in ("st_dev", "st_ino", "st_size", "st_mtime_ns"))) for p in paths]
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    known = cache_dir() / "digests" / key
    try:
        return known.read_text().strip()
    except OSError:
        pass
    digest = sha256_files(paths)
    known.parent.mkdir(parents=True, exist_ok=True)
    staged = known.with_name(f"{key}.{os.getpid()}.tmp")
    staged.write_text(digest)
    staged.replace(known)
    return digest
