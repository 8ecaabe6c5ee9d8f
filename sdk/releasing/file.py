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

from ..errors import EdgeqError

STATE = ".release"          # OUTPUT/.release: records of cells, the file-hash memo, staging folders, the chart

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]  # becomes a folder name


Fraction = Annotated[float, Field(ge=0, le=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Targets(_Strict):
    """Quality targets, as `edgeq export` takes them; set on the release, a model or a device, all apply."""
    max_kl: PositiveFloat | None = None       # mean KL from the original, on eval_data (else a built-in sample)
    min_retention: Fraction | None = None     # flip retention on eval_data (needs an adapter or base)
    min_agreement: Fraction | None = None     # greedy-reply exact-match rate on eval_data's prompts


class ModelEntry(_Targets):
    name: Name
    path: Path                                # a Hugging Face checkpoint folder
    adapter: Path | None = None               # a PEFT LoRA folder merged into `path`
    base: Path | None = None                  # the model before fine-tuning, for retention (an adapter implies it)
    calibration: Path | None = None           # overrides the release's calibration data for this model
    eval_data: Path | None = None             # overrides the release's eval data for this model


class DeviceEntry(_Targets):
    name: Name
    profile: Path | None = None               # a profile .toml; without it `name` is a built-in profile
    format: str | None = None                 # default: the first format the profile runs that edgeq exports
    precision: str | None = None              # one precision for every tensor; default: planned for the device
    size: str | PositiveInt | None = None     # plan within this size instead of the device's budget

    @model_validator(mode="after")
    def _one_budget(self):
        if self.precision is not None and self.size is not None:
            raise ValueError("precision and size exclude each other: a forced precision has no size budget; keep one")
        return self


class RunSettings(_Strict):
    cpus_per_task: PositiveInt = 1            # threads of each task, and the CPUs it asks Ray for
    workers: PositiveInt | None = None        # local processes at once (default: cores ÷ cpus_per_task)
    memory_gib: PositiveFloat | None = None   # local memory all tasks may use at once (default: 80% of available)


class Release(_Targets):
    output: Path
    calibration: Path | None = None           # text or JSONL chats for importance, GPTQ and sensitivity (default: built-in)
    eval_data: Path | None = None             # text, JSONL chats or prompt/completion each cell is judged on
    eval_tokens: PositiveInt = 1024           # tokens of the built-in sample every cell is also measured on
    eval_ctx: PositiveInt = 256
    eval_data_tokens: PositiveInt = 2048      # tokens of eval_data measured
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

    def targets_for(self, model: ModelEntry, device: DeviceEntry) -> dict:
        """Every target that applies must hold, so the strictest of each kind decides."""
        levels = (self, model, device)
        out = {"max_kl": min((t.max_kl for t in levels if t.max_kl is not None), default=None),
               "min_retention": max((t.min_retention for t in levels if t.min_retention is not None), default=None),
               "min_agreement": max((t.min_agreement for t in levels if t.min_agreement is not None), default=None)}
        return {k: v for k, v in out.items() if v is not None}


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

    data = fix(data, ("output", "calibration", "eval_data", "cache"))
    for kind, keys in (("model", ("path", "adapter", "base", "calibration", "eval_data")), ("device", ("profile",))):
        if isinstance(data.get(kind), list):
            data[kind] = [fix(e, keys) if isinstance(e, dict) else e for e in data[kind]]
    return data


def _check_inputs(release: Release) -> None:
    """Inputs every cell of a model needs must exist, and a target must have what it is measured on: missing
    ones are a mistake in the file, not a cell's failure."""
    def need(value: Path | None, where: str, folder: bool) -> None:
        if value is not None and not (value.is_dir() if folder else value.is_file()):
            kind = "folder" if folder else "file"
            raise EdgeqError(f"{release.source}: {where}: {kind} {value} does not exist; fix the path (relative to the release file)")

    need(release.calibration, "calibration", False)
    need(release.eval_data, "eval_data", False)
    for i, m in enumerate(release.models):
        for field, folder in (("path", True), ("adapter", True), ("base", True), ("calibration", False), ("eval_data", False)):
            need(getattr(m, field), f"model[{i}].{field}", folder)
        for device in release.devices:
            targets = release.targets_for(m, device)
            on_data = [t for t in ("min_retention", "min_agreement") if t in targets]
            if on_data and not (m.eval_data or release.eval_data):
                raise EdgeqError(f"{release.source}: model[{i}]: {on_data[0]} is measured on your data; set eval_data "
                                 "(for the release or this model)")
            if "min_retention" in targets and not (m.adapter or m.base):
                raise EdgeqError(f"{release.source}: model[{i}]: min_retention needs the model before fine-tuning; "
                                 "set adapter or base")


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
    _check_inputs(release)
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
