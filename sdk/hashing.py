"""Content hashes: bundle checksums, source fingerprints and cache keys all stream files the same way."""
from __future__ import annotations

import hashlib
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
