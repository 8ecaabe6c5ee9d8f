"""`release.toml`: the models, devices, data and quality targets of one release, validated on load.

The file is checked whole before any work starts, so a typo fails in a second with the field named
(`device[2].precision: ...`) instead of an hour into a release. Paths are relative to the file.
What only the device profile itself can tell (a malformed profile file) is left to its cells, so one
bad device fails its own cells and not the release.
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator

from .errors import EdgeqError

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]  # becomes a folder name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    name: Name
    path: Path                                # a Hugging Face checkpoint folder
    adapter: Path | None = None               # a PEFT LoRA folder merged into `path`
    calibration: Path | None = None           # overrides the release's calibration text for this model
    max_kl: PositiveFloat | None = None       # quality target for this model's cells


class DeviceEntry(_Strict):
    name: Name
    profile: Path | None = None               # a profile .toml; without it `name` is a built-in profile
    format: str | None = None                 # default: the first format the profile runs that edgeq exports
    precision: str | None = None              # one precision for every tensor; default: planned for the device
    size: str | PositiveInt | None = None     # plan within this size instead of the device's budget
    max_kl: PositiveFloat | None = None       # quality target for this device's cells

    @model_validator(mode="after")
    def _one_budget(self):
        if self.precision is not None and self.size is not None:
            raise ValueError("precision and size exclude each other: a forced precision has no size budget; keep one")
        return self


class RunSettings(_Strict):
    cpus_per_task: PositiveInt = 1            # threads of each task, and the CPUs it asks Ray for
    workers: PositiveInt | None = None        # local processes at once (default: cores ÷ cpus_per_task)
    memory_gib: PositiveFloat | None = None   # local memory all tasks may use at once (default: 80% of available)


class Release(_Strict):
    output: Path
    calibration: Path | None = None           # text for importance matrices and sensitivity (default: built-in)
    eval_text: Path | None = None             # text each cell's quality is measured on (default: built-in sample)
    eval_tokens: PositiveInt = 1024
    eval_ctx: PositiveInt = 256
    max_kl: PositiveFloat | None = None       # quality target of every cell
    cache: Path | None = None                 # edgeq's cache (sensitivity); on a cluster, a shared folder
    run: RunSettings = RunSettings()
    models: list[ModelEntry] = Field(alias="model", min_length=1)
    devices: list[DeviceEntry] = Field(alias="device", min_length=1)
    source: Path = Path("release.toml")       # the file itself, for messages and the report

    @field_validator("models", "devices")
    @classmethod
    def _unique_names(cls, entries):
        names = [e.name for e in entries]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"name {dupes[0]!r} is used twice; names become folders and must be unique")
        return entries

    def max_kl_for(self, model: ModelEntry, device: DeviceEntry) -> float | None:
        """Every target that applies must hold, so the strictest one decides."""
        kls = [k for k in (self.max_kl, model.max_kl, device.max_kl) if k is not None]
        return min(kls) if kls else None


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _resolve(data: dict, base: Path) -> dict:
    """Relative paths are relative to the release file, wherever edgeq is run from."""
    def fix(table: dict, keys: tuple[str, ...]) -> dict:
        return {k: (str(base / Path(v).expanduser()) if k in keys and isinstance(v, str) else v) for k, v in table.items()}

    data = fix(data, ("output", "calibration", "eval_text", "cache"))
    for kind, keys in (("model", ("path", "adapter", "calibration")), ("device", ("profile",))):
        if isinstance(data.get(kind), list):
            data[kind] = [fix(e, keys) if isinstance(e, dict) else e for e in data[kind]]
    return data


def _check_paths(release: Release) -> None:
    """Inputs every cell of a model needs must exist: missing ones are a mistake in the file, not a cell's failure."""
    def need(value: Path | None, where: str, folder: bool) -> None:
        if value is not None and not (value.is_dir() if folder else value.is_file()):
            kind = "folder" if folder else "file"
            raise EdgeqError(f"{release.source}: {where}: {kind} {value} does not exist; fix the path (relative to the release file)")

    need(release.calibration, "calibration", False)
    need(release.eval_text, "eval_text", False)
    for i, m in enumerate(release.models):
        need(m.path, f"model[{i}].path", True)
        need(m.adapter, f"model[{i}].adapter", True)
        need(m.calibration, f"model[{i}].calibration", False)


def load_release(path: str | Path) -> Release:
    """Reads and validates a release file; every problem is an EdgeqError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(f"release file {path} not found; write one (see examples/release.toml)")
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgeqError(f"{path}: not valid TOML: {exc}") from None
    if "source" in data:
        raise EdgeqError(f"{path}: source: unknown field; remove it")
    try:
        release = Release.model_validate({**_resolve(data, path.resolve().parent), "source": path})
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        where = _location(first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        raise EdgeqError(f"{path}: {where}: {message}{more}; fix the release file") from None
    _check_paths(release)
    return release


def memory_budget(release: Release) -> int:
    """Bytes the local workers may use at once: the file's `run.memory_gib`, else 80% of what is available now."""
    import psutil

    if release.run.memory_gib is not None:
        return int(release.run.memory_gib * (1 << 30))
    return int(psutil.virtual_memory().available * 0.8)


def local_workers(release: Release) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return release.run.workers or max(1, cores // release.run.cpus_per_task)
