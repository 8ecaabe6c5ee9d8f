"""Built-in device profiles: one TOML file per device; the file stem is the --device name.

This package is also the loader. Each profile says how much memory, bandwidth and compute a target
has and which formats run there; a user can pass a path to their own file with the same schema.
Every value is checked on load so that a typo fails here, with the field and file named, rather
than as a wrong estimate later. (The code lives here, not in sdk/devices.py, because the package
and a module of the same name `edgeq.devices` would shadow each other.)
"""
from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib.resources import files
from pathlib import Path
from typing import Any

from .. import registry
from ..errors import EdgeqError

KINDS = ("phone", "tablet", "laptop", "desktop", "sbc", "embedded")
OSES = ("ios", "android", "macos", "linux", "windows")
GIB = 1 << 30


@dataclass(frozen=True)
class DeviceProfile:
    id: str
    name: str
    kind: str
    os: str
    ram_gib: float
    budget_gib: float
    bandwidth_gbps: float
    cpu: str
    cores: int
    threads: int
    cpu_gflops: float
    accelerator: str
    formats: tuple[str, ...]
    context_length: int
    precisions: dict[str, tuple[str, ...]] = field(hash=False)
    source: str = ""

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_gib * GIB)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy for a bundle manifest. `source` is left out: it is a path on the
        machine that built the bundle and means nothing where the bundle is deployed."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source"}
        out["formats"] = list(self.formats)
        out["precisions"] = {k: list(v) for k, v in self.precisions.items()}
        return out


def list_devices() -> list[str]:
    """Ids of the built-in profiles, sorted."""
    return sorted(p.name[:-5] for p in files(__name__).iterdir() if p.name.endswith(".toml"))


def load_device(name_or_path: str | Path) -> DeviceProfile:
    """Load a built-in profile by id (`pixel-8`) or a user profile by path (`./my-board.toml`).

    A string counts as a path when it ends in `.toml` or contains a slash, so ids never clash
    with files in the working directory.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise EdgeqError(f"device file '{path}' not found; pass an existing .toml file or a built-in id")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EdgeqError(f"device file '{path}' is not UTF-8 text; pass a .toml device profile") from None
        return _parse(text, path.stem, str(path))
    resource = files(__name__) / f"{text}.toml"
    if not resource.is_file():
        known = list_devices()
        close = difflib.get_close_matches(text, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise EdgeqError(
            f"device '{text}' not found{hint}; known: {', '.join(known)} — or pass a path to a .toml file")
    return _parse(resource.read_text(encoding="utf-8"), text, str(resource))


def _parse(text: str, device_id: str, source: str) -> DeviceProfile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # the message carries "(at line N, column M)"
        raise EdgeqError(f"device file {source}: invalid TOML: {e}") from None
    except (RecursionError, ValueError):  # nested past the parser's depth, or an integer of thousands of digits
        raise EdgeqError(f"device file {source}: invalid TOML: nested too deeply or a number too long") from None

    def bad(key: str, problem: str) -> EdgeqError:
        return EdgeqError(f"device file {source}: {key} {problem}")

    def get(key: str, kind: type, default: Any = None) -> Any:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not None:
                    return default
                raise bad(key, "is missing; see the built-in profiles for the schema")
            node = node[part]
        if kind is float and isinstance(node, int) and not isinstance(node, bool):
            if abs(node) > 2**64:  # float() of a 400-digit integer overflows
                raise bad(key, "is far too large")
            node = float(node)
        ok = isinstance(node, kind) and not isinstance(node, bool)
        if kind is list:
            ok = ok and bool(node) and all(isinstance(x, str) for x in node)
        if not ok:
            what = {float: "a number", int: "an integer", str: "a string", dict: "a table",
                    list: "a non-empty list of strings"}
            raise bad(key, f"must be {what[kind]}, got {node!r}")
        return node

    def positive(key: str, kind: type) -> Any:
        value = get(key, kind)
        if not 0 < value < math.inf:  # also rejects TOML's nan and inf
            raise bad(key, f"must be > 0, got {value}")
        return value

    def choice(key: str, allowed: tuple[str, ...], value: str | None = None) -> str:
        value = get(key, str) if value is None else value
        if value not in allowed:
            raise bad(key, f"'{value}' is not one of: {', '.join(allowed)}")
        return value

    ram, budget = positive("memory.ram_gib", float), positive("memory.budget_gib", float)
    if budget > ram:
        raise bad("memory.budget_gib", f"= {budget} exceeds memory.ram_gib = {ram}; lower it")
    cores, threads = positive("compute.cores", int), positive("compute.threads", int)
    if threads > 2 * cores:
        raise bad("compute.threads", f"= {threads} exceeds 2 x compute.cores ({cores})")
    formats = get("runtime.formats", list)
    for fmt in formats:
        choice("runtime.formats", tuple(registry.formats.names()), fmt)
    if len(set(formats)) != len(formats):
        raise bad("runtime.formats", f"lists a format twice: {formats}")
    table = get("runtime.precisions", dict)
    for fmt in table:
        if fmt not in formats:
            raise bad(f"runtime.precisions.{fmt}", f"is given but '{fmt}' is not in runtime.formats {formats}")
    precisions = {}
    for fmt in formats:
        names = get(f"runtime.precisions.{fmt}", list)
        for n in names:  # the uniform precisions the format's spec gives a nominal size
            choice(f"runtime.precisions.{fmt}", registry.formats.get(fmt).device_precisions(), n)
        precisions[fmt] = tuple(names)

    return DeviceProfile(
        id=device_id,
        name=get("name", str),
        kind=choice("kind", KINDS),
        os=choice("os", OSES),
        ram_gib=ram,
        budget_gib=budget,
        bandwidth_gbps=positive("memory.bandwidth_gbps", float),
        cpu=get("compute.cpu", str),
        cores=cores,
        threads=threads,
        cpu_gflops=positive("compute.cpu_gflops", float),
        accelerator=get("compute.accelerator", str, default=""),
        formats=tuple(formats),
        context_length=positive("runtime.context_length", int),
        precisions=precisions,
        source=source,
    )
