"""Reads safetensors headers without loading weights, and refuses truncated or pickle files."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeqError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name → info, after checking that the file holds every byte its header promises."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise EdgeqError(f"{path} is not a readable safetensors file ({exc}); re-download or re-save it") from exc
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + header_len + end > size:
        raise EdgeqError(
            f"{path} is truncated: its header needs {8 + header_len + end} bytes, the file has {size}; "
            "re-download or re-save the checkpoint"
        )
    return {name: TensorInfo(path, t["dtype"], tuple(t["shape"])) for name, t in header.items()}


def index_folder(folder: Path, trust_pickle: bool = False) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint folder (single or sharded safetensors)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not trust_pickle:
            raise EdgeqError(
                f"{folder} holds pickle weights ({', '.join(pickles)}), which can run code when loaded; "
                "convert them to safetensors, or pass --trust-pickle if you trust their origin"
            )
        if pickles:
            return {}  # loaded through torch.load by load_pickle_tensors
        raise EdgeqError(f"no weights found in {folder}: expected *.safetensors files")
    index: dict[str, TensorInfo] = {}
    for path in files:
        index.update(read_header(path))
    return index


def load_pickle_tensors(folder: Path) -> dict:
    """Loads trusted pickle weights (`--trust-pickle`), tensors only."""
    import torch

    tensors = {}
    for path in sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES):
        try:
            tensors.update(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
        except Exception as exc:
            raise EdgeqError(f"could not load pickle weights {path.name}: {exc}") from exc
    return tensors
