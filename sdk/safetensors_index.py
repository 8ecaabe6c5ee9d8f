"""Reads safetensors headers without loading weights, and refuses damaged, lying or pickle files.

The header is JSON written by whoever made the file. Before edgeq memory-maps a byte of it, each entry
must be a known dtype with a shape whose size matches its byte range, the ranges must tile the data
section exactly (no overlap, no gap, nothing past the end), and a sharded checkpoint must have every
shard its index names, holding the tensors the index puts there. The same rules the safetensors
library enforces at load time, checked up front so a bad file is one line naming it, not a panic.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeqError
from .validate import json_type, read_json_object

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER = 100 << 20  # the safetensors library's own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_SHARD = re.compile(r".*-(\d+)-of-(\d+)\.safetensors")
REDOWNLOAD = "re-download or re-save the checkpoint"


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


def _entry(path: Path, name, entry) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, or one line naming what is wrong with it."""
    def bad(problem: str) -> EdgeqError:
        return EdgeqError(f"{path}: tensor {name!r} {problem}; {REDOWNLOAD}")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise bad("must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise bad(f"has dtype {dtype!r}, which is not one of {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}, not a list of sizes ≥ 0")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end] with 0 ≤ begin ≤ end")
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise bad(f"claims {offsets[1] - offsets[0]} bytes but a {dtype} tensor of shape {tuple(shape)} has {nbytes}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def parse_header(path: Path, raw: bytes, file_size: int) -> dict[str, TensorInfo]:
    """Tensor name → info from a header's bytes, after every check; `file_size` is the whole file's."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested past the parser's depth
        raise EdgeqError(f"{path} is not a safetensors file (its header is not JSON: {type(exc).__name__}); {REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise EdgeqError(f"{path}: the safetensors header is a JSON {json_type(header)}, not an object; {REDOWNLOAD}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise EdgeqError(f"{path}: __metadata__ must map names to strings; {REDOWNLOAD}")
    entries = sorted(((*_entry(path, name, entry), name) for name, entry in header.items()), key=lambda e: (e[2], e[3]))
    data = file_size - 8 - len(raw)
    position, previous = 0, None
    for dtype, shape, begin, end, name in entries:
        if begin != position:
            where = f"overlaps {previous!r}" if begin < position else f"leaves {begin - position} unused bytes after {previous or 'the header'!r}"
            raise EdgeqError(f"{path}: tensor {name!r} starts at byte {begin} and {where}; {REDOWNLOAD}")
        position, previous = end, name
    if position > data:
        raise EdgeqError(f"{path} is truncated: its header needs {8 + len(raw) + position} bytes, the file has {file_size}; {REDOWNLOAD}")
    if position < data:
        raise EdgeqError(f"{path} has {data - position} bytes after its last tensor that its header does not describe; {REDOWNLOAD}")
    return {name: TensorInfo(path, dtype, shape) for dtype, shape, _, _, name in entries}


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name → info, after checking that the file holds exactly the bytes its header promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            start = f.read(8)
            if len(start) < 8:
                raise EdgeqError(f"{path} is {size} bytes long, too short for a safetensors file; {REDOWNLOAD}")
            (header_len,) = struct.unpack("<Q", start)
            if header_len > min(size - 8, MAX_HEADER):
                raise EdgeqError(f"{path} is not a readable safetensors file (a header of {header_len} bytes in a file of "
                                 f"{size}); {REDOWNLOAD}")
            raw = f.read(header_len)
    except OSError as exc:
        raise EdgeqError(f"{path} cannot be read ({exc.strerror}); check the file's permissions") from None
    return parse_header(path, raw, size)


def _sharded(folder: Path, files: list[Path]) -> None:
    """A sharded checkpoint has every shard its index (or its -NNNNN-of-NNNNN names) promises."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json_object(index_path, REDOWNLOAD).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise EdgeqError(f"{index_path}: weight_map must map tensor names to shard file names; {REDOWNLOAD}")
        present = {p.name for p in files}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise EdgeqError(f"{index_path} names a shard outside the folder ({shard!r}); {REDOWNLOAD}")
            if shard not in present:
                raise EdgeqError(f"shard {shard} named by {INDEX_FILE} is missing from {folder}; download it there")
    numbered = [m for p in files if (m := _SHARD.fullmatch(p.name))]
    if numbered:
        total = int(numbered[0][2])
        have = {int(m[1]) for m in numbered}
        missing = sorted(set(range(1, total + 1)) - have)
        if missing:
            name = numbered[0][0].replace(f"-{numbered[0][1]}-of-", f"-{missing[0]:0{len(numbered[0][1])}d}-of-")
            raise EdgeqError(f"shard {name} is missing from {folder} ({len(have)} of {total} shards there); download it there")


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
        if (folder / INDEX_FILE).is_file():
            _sharded(folder, files)
        raise EdgeqError(f"no weights found in {folder}: expected *.safetensors files")
    _sharded(folder, files)
    index: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_header(path).items():
            if name in index:
                raise EdgeqError(f"tensor {name} is in both {index[name].file.name} and {path.name}; {REDOWNLOAD}")
            index[name] = info
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        for name, shard in read_json_object(index_path, REDOWNLOAD)["weight_map"].items():
            if name not in index or index[name].file.name != shard:
                raise EdgeqError(f"{INDEX_FILE} puts {name} in shard {shard}, which does not hold it; re-download {shard}")
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
