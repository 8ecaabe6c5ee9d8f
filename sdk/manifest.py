"""The manifest's schema (version 1): what a bundle must say about itself before edgeq opens a file in it.

A bundle may come from anywhere (a download, a colleague, a shared drive), so its `edgeq.json` is input
like any other. Every path in it is a plain relative path inside the bundle, every field the runtime and
the CLI read has its type checked, and the file a runtime opens must be among the checksummed ones: a
manifest cannot point edgeq at `../../elsewhere`, and a malformed one fails in one line naming the field.
Fields edgeq does not read pass through unchecked (converters add their own), so the schema only grows
stricter where something depends on a value.
"""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from .errors import EdgeqError
from .validate import first_error, json_type

MANIFEST_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"  # opened by every runtime through edgeq's tokenizer
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # an adapter's name becomes a file name, a URL path part and `bundle:NAME` in a server


def bundle_path(name: str) -> str:
    """A path inside the bundle: relative, '/'-separated, normalised (no '.', '..' or empty parts)."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise ValueError(f"{name!r} is not a relative path inside the bundle")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(f"{name!r} is not a normalised path inside the bundle (no '.', '..' or '//')")
    return name


BundlePath = Annotated[str, AfterValidator(bundle_path)]
Name = Annotated[str, Field(min_length=1)]
AdapterName = Annotated[str, Field(pattern=ADAPTER_NAME)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, defer_build=True)  # built on first use: `edgeq --help` stays fast


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, defer_build=True)
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    bytes: NonNegativeInt


class TokenizerRecord(_Record):
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = False
    stop_token_ids: list[NonNegativeInt] = []


class Quality(_Record):
    kl: float
    top1: float
    ppl: float
    ppl_ref: float
    tokens: NonNegativeInt


class PlanCheck(_Record):
    predicted_kl: float
    measured_kl: float
    note: str | None = None


class Mismatch(_Record):
    tensor: str
    asked: str
    got: str
    why: str


class TensorRecord(_Record):
    type: str


class DeviceRecord(_Record):
    id: Name
    threads: PositiveInt | None = None


class AdapterRecord(_Record):
    path: str


class KeptAdapterRecord(_Record):
    """A LoRA adapter kept apart from the base: the runtime opens its file and switches to it by name."""
    name: AdapterName
    file: BundlePath


class SourceRecord(_Record):
    path: str | None = None
    architecture: str | None = None
    adapter: AdapterRecord | None = None


class Manifest(_Record):
    edgeq_manifest: Literal[1]
    edgeq_version: str
    created: str
    format: Name
    runtime: Name
    model_file: BundlePath
    precision: Name
    context_length: PositiveInt | None = None
    files: Annotated[dict[BundlePath, FileEntry], Field(min_length=1)]
    tokenizer: TokenizerRecord
    source: SourceRecord | None = None
    device: DeviceRecord | None = None
    quality: Quality | None = None
    plan_check: PlanCheck | None = None
    mismatches: list[Mismatch] = []
    tensors: dict[str, TensorRecord] = {}
    bits_per_weight: float | None = None
    adapters: list[KeptAdapterRecord] = []
    trust_pickle: Literal[False] = False  # the runtimes read it; a bundle from elsewhere must not grant pickle trust


def check_manifest(data, where: str) -> dict:
    """`data` (parsed JSON) if it is a manifest this edgeq may trust its paths and types from; else one line."""
    fix = "re-export the bundle with `edgeq export`"
    if not isinstance(data, dict):
        raise EdgeqError(f"{where} holds a JSON {json_type(data)}, not a manifest object; {fix}")
    version = data.get("edgeq_manifest")
    if type(version) is not int or version != MANIFEST_VERSION:
        newer = type(version) is int and version > MANIFEST_VERSION
        raise EdgeqError(f"{where} has manifest version {version!r}; this edgeq reads version {MANIFEST_VERSION}: "
                         + ("upgrade edgeq" if newer else fix))
    try:
        Manifest.model_validate(data)
    except ValidationError as exc:
        field, message = first_error(exc)
        raise EdgeqError(f"{where}: {field}: {message}; {fix}") from None
    files, model = data["files"], data["model_file"]
    if model not in files and not any(name.startswith(model + "/") for name in files):
        raise EdgeqError(f"{where}: model_file {model!r} is not among the checksummed files; {fix}")
    for entry in data.get("adapters") or []:
        if entry["file"] not in files:
            raise EdgeqError(f"{where}: adapter {entry['name']!r} file {entry['file']!r} is not among the checksummed files; {fix}")
    if len({entry["name"] for entry in data.get("adapters") or []}) != len(data.get("adapters") or []):
        raise EdgeqError(f"{where}: two adapters share a name; {fix}")
    if TOKENIZER_FILE not in files:
        raise EdgeqError(f"{where}: files: {TOKENIZER_FILE} is not among the checksummed files; {fix}")
    return data
