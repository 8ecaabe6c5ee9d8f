"""What an export is asked to do: one object, checked where it comes in.

The Python API (`edgeq.export(model, **options)`), the CLI (`edgeq export`) and a release file's cells all
build an `ExportOptions`; the export reads its choices from it and from nothing else, so an option means
the same wherever it was given and its range is checked once, naming the option.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .errors import EdgeqError
from .quant.effort import rounding_for
from .quant.rotation import ROTATE_CHOICES
from .quant.targets import Targets

FORMAT_OPTIONS = ("mobile", "block_size", "rounding")  # fields a format takes or refuses (`FormatSpec.options`)


@dataclass(frozen=True)
class ExportOptions:
    """Every option of `edgeq.export`; see its docstring (and `edgeq export --help`) for what each does."""

    model: str | Path | None = None
    revision: str | None = None
    device: str | Path | None = None
    adapter: str | Path | None = None
    adapters: dict | list | None = None
    keep_adapters: bool = False
    adapter_data: dict | None = None
    compare_merged: bool = False
    format: str | None = None
    precision: str | None = None
    tensor_types: dict[str, str] | None = None
    size: str | int | None = None
    bits_per_weight: float | None = None
    calibration: str | Path | None = None
    calibration_tokens: int = 8192
    mobile: bool = False
    block_size: int | None = None
    rounding: str | None = None
    effort: str | None = None
    kv_cache: str | None = None
    rotate: str | None = None  # None: the format's default (`FormatSpec.rotates_by_default`)
    output: str | Path | None = None
    overwrite: bool = False
    trust_pickle: bool = False
    eval_tokens: int = 1024
    eval_ctx: int = 256
    eval_data: str | Path | None = None
    eval_data_tokens: int = 2048
    base: str | Path | None = None
    max_kl: float | None = None
    min_retention: float | None = None
    min_agreement: float | None = None
    allow_quality_miss: bool = False
    progress: bool | None = None

    def __post_init__(self):
        from .validate import BITS_PER_WEIGHT, CONTEXT, TOKENS, TOKENS_OR_ZERO, parse_size

        TOKENS.check("calibration_tokens", self.calibration_tokens)
        TOKENS.check("eval_data_tokens", self.eval_data_tokens)
        TOKENS_OR_ZERO.check("eval_tokens", self.eval_tokens)
        CONTEXT.check("eval_ctx", self.eval_ctx)
        if self.bits_per_weight is not None:
            BITS_PER_WEIGHT.check("bits_per_weight", self.bits_per_weight)
        if self.size is not None:
            object.__setattr__(self, "size", parse_size(self.size))
        if rounding_for(self.effort, self.rounding) == "learned" and self.keep_adapters:  # an unknown effort, or both given: refused before any work
            raise EdgeqError("--effort max (learned scales) does not fit a base for kept adapters yet: merge the "
                             "adapters, or keep them with --effort standard")
        if self.rotate is not None and self.rotate not in ROTATE_CHOICES:
            raise EdgeqError(f"rotate={self.rotate!r} is not one of {', '.join(ROTATE_CHOICES)}")
        if self.adapters is not None and self.adapter is not None:
            raise EdgeqError("pass the adapters either as adapter= or as adapters=, not both")

    @classmethod
    def of(cls, model=None, **options) -> "ExportOptions":
        """From `edgeq.export`'s keywords; an unknown one is refused by name, with the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise EdgeqError(f"unknown export option {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known - {'model'}))}")
        return cls(model=model, **options)

    @property
    def targets(self) -> Targets:
        return Targets(self.max_kl, self.min_retention, self.min_agreement)

    @property
    def format_options(self) -> dict:
        return {**{name: getattr(self, name) for name in FORMAT_OPTIONS}, "rounding": rounding_for(self.effort, self.rounding)}

    @property
    def wants_plan(self) -> bool:
        """No forced precision, and something to plan for: a device, a size, or a quality target."""
        return self.precision is None and (self.device is not None or self.size is not None
                                           or self.bits_per_weight is not None or bool(self.targets))
