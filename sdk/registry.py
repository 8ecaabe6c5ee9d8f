"""Name → backend registries, filled from entry points so built-ins and plugins register alike.

`formats` holds each format's light spec (`edgeq.formats.FormatSpec`); its converter, and the heavy
library behind it, is imported only when an export runs. `runtimes` holds engine classes, imported
when chosen. So `edgeq --help` and `edgeq devices` never import torch, llama_cpp, onnxruntime or coremltools.
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from .errors import EdgeqError

DEFAULT_FORMAT = "gguf"        # what an export writes when neither a format nor a device says otherwise
REFERENCE_RUNTIME = "torch"    # the float model every format is measured against


class Registry:
    def __init__(self, group: str, kind: str):
        self.group = group
        self.kind = kind
        self._loaded: dict[str, object] = {}

    def _targets(self) -> dict[str, str]:
        return {ep.name: ep.value for ep in entry_points(group=self.group)}

    def names(self) -> list[str]:
        return sorted(self._targets())

    def get(self, name: str):
        if name in self._loaded:
            return self._loaded[name]
        target = self._targets().get(name)
        if target is None:
            raise EdgeqError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or 'none'}")
        module_name, _, attr = target.partition(":")
        try:
            obj = getattr(import_module(module_name), attr)
        except ImportError as exc:
            extra = extra_for(exc.name or "")
            how = f"pip install 'edgeq[{extra}]'" if extra else f"pip install {exc.name}"
            raise EdgeqError(f"{self.kind} {name!r} needs a package that is not installed ({exc.name}); install it with: {how}") from exc
        self._loaded[name] = obj
        return obj


def extra_for(module: str) -> str | None:
    """The extra of edgeq's own metadata (pyproject's optional-dependencies) whose requirements name the
    distribution of `module` (a top-level import name such as onnxruntime); None when no extra does."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    try:
        wanted = requires("edgeq") or []
    except PackageNotFoundError:
        return None
    top = module.partition(".")[0].replace("_", "-").lower()
    for line in wanted:
        dist = re.split(r"[\s<>=!~;\[(]", line, maxsplit=1)[0].replace("_", "-").lower()
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        if dist == top and extra and extra.group(1) not in ("all", "test"):
            return extra.group(1)
    return None


formats = Registry("edgeq.formats", "format")
runtimes = Registry("edgeq.runtimes", "runtime")
