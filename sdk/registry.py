"""Name → backend registries, filled from entry points so built-ins and plugins register alike.

A backend is imported only when it is chosen, so `edgeq --help` never imports torch,
llama_cpp, onnxruntime or coremltools.
"""
from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from .errors import EdgeqError


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
            raise EdgeqError(
                f"{self.kind} {name!r} needs a package that is not installed ({exc.name}); "
                f"install it with: pip install 'edgeq[{name}]'"
            ) from exc
        self._loaded[name] = obj
        return obj


converters = Registry("edgeq.converters", "format")
runtimes = Registry("edgeq.runtimes", "runtime")
