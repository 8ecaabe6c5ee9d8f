"""The converter seam: a light `FormatSpec` per format, and the `Converter` that writes it.

A format's facts — its precisions, their nominal bits per weight, the planner's precision space, the
KV-cache element size its runtime allocates, the options `convert()` accepts — are declared once, in
its spec, and everything else (export, planning, device profiles, profiling) asks the registry for
the spec. A spec imports no heavy library, so `edgeq devices` and `edgeq --help` stay fast; its
`converter()` imports the converter (and llama_cpp, onnx or coremltools) only when an export runs.
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import EdgeqError
from .quant.effort import BY_GPTQ


class PrecisionSpace(Protocol):
    """The planner's view of a format: what each tensor can be stored as, its bytes and its round trip."""

    format: str
    float_bytes: int  # per element of the tensors that are never quantized (norms, biases)
    tied_head_types: tuple[str, ...]  # what a tied checkpoint's head may be stored as apart from its table; () if it is the table

    def candidates(self, shape: tuple[int, ...]) -> list[str]:
        """Precisions this tensor can take, smallest first."""

    def nbytes(self, precision: str, shape: tuple[int, ...]) -> int: ...

    def round_trip(self, weight: np.ndarray, precision: str, importance: np.ndarray | None) -> np.ndarray:
        """The weight as the format will hold it (quantized, then dequantized), float32."""

    def gptq_grid(self, precision: str, weight, importance: np.ndarray | None):
        """The grid (`edgeq.quant.gptq.Grid`) an export rounding by GPTQ rounds a (rows, cols) torch `weight` on at
        `precision`, or None where it keeps nearest rounding (float types, widths the blocks do not divide)."""


@runtime_checkable
class Converter(Protocol):
    spec: "FormatSpec"

    def convert(self, source, stage: Path, *, precision: str, overrides: dict[str, str] | None = None,
                calibration=None, progress: bool | None = None, **options) -> dict:
        """Writes the model into `stage`; returns the manifest fields read back from what was written:
        `model_file`, `precision`, `tensors` (HF name → type, shape, bytes), `bits_per_weight`, `mismatches`.
        `overrides` (HF weight name → precision) come from a plan or `--tensor-type`; `calibration`
        (`edgeq.quant.calibration.Calibration`) is the one route to calibration data, used as the format needs."""


class FormatSpec:
    """Base of every format's spec; subclasses set the class attributes and `space()`."""

    name: str
    runtime: str                      # the engine that runs a bundle of this format
    eval_runtime: str | None = None   # the engine that measures it here, when `runtime` cannot (Core ML off macOS)
    converter_target: str             # "module:Class", imported on first `converter()`
    precisions: tuple[str, ...]       # what `--precision` and `--tensor-type` accept
    default_precision: str
    float_precision: str              # the most exact precision: what must reproduce the torch reference
    planned_precision: str            # base type of a planned export (the plan names every weight)
    nominal_bpw: dict[str, float]     # bits per weight of a uniform export: the size a device's precision implies
    options: tuple[str, ...] = ()     # keyword options `convert()` accepts beyond the common ones
    roundings: tuple[str, ...] = ()   # what its `rounding` option accepts, the default first
    gptq_precisions: tuple[str, ...] = ()  # the precisions `rounding="gptq"` rounds by GPTQ
    gptq_needs_text = False           # the default rounding is GPTQ only on the user's own calibration text
    rotates_by_default = False        # rotate=None rotates where the export rounds by GPTQ and the model allows it
    kept_adapters: str | None = None  # the engine's own adapter form, when `convert(adapters=)` writes LoRAs apart from the base
    kept_adapters_refusal = "edgeq does not write adapter files for it"  # why not, when it cannot
    kv_element_bytes: int = 2         # bytes per KV-cache element as the runtime allocates it
    kv_cache_types: dict[str, float] = {}  # cache types a bundle may ask its runtime for (bytes per element, the
                                           # default first); empty: the runtime's cache is fixed at kv_element_bytes
    export_bytes_per_weight: float = 8  # peak resident memory of an export per weight (scheduling, up-front checks)
    case_sensitive: bool = False
    hub_library: str = ""             # the model card's `library_name`: how the Hugging Face hub files this format
    run_elsewhere: str = ""           # the model card's "how to run it" with the format's own runtime (Markdown;
                                      # {model_file} and {name} are the bundle's)
    debug_files: tuple[str, ...] = ()  # files of a bundle no runtime loads (debug records): not counted in its size
    trace_reader: str | None = None   # "module:function" reading the runtime's own trace from a device (`edgeq profile --etdump`)

    def normalize(self, precision: str) -> str:
        """The precision as this format spells it (GGUF upper case, ONNX and Core ML lower case), or a one-line refusal."""
        for known in self.precisions:
            if known == precision or (not self.case_sensitive and known.lower() == str(precision).lower()):
                return known
        raise EdgeqError(f"{self.name} precision {precision!r} is not supported; choose one of {', '.join(self.precisions)}")

    def kv_bytes_per_element(self, cache_type: str | None = None) -> float:
        """Bytes per cached key or value element at `cache_type` (None: the runtime's default)."""
        if cache_type is None:
            return self.kv_element_bytes
        if cache_type not in self.kv_cache_types:
            choices = ", ".join(self.kv_cache_types) or "none: its runtime's cache has one type"
            raise EdgeqError(f"{self.name} has no KV cache type {cache_type!r}; choose one of {choices}")
        return self.kv_cache_types[cache_type]

    def rounds_by_gptq(self, precision: str, rounding: str | None, text_given: bool = True) -> bool:
        """Whether an export at `precision` rounds by GPTQ, and so loads the float model (`rounding` None: the
        default, which for a format with `gptq_needs_text` is GPTQ only when the user gave calibration text)."""
        default = next(iter(self.roundings), None) if text_given or not self.gptq_needs_text else "nearest"
        return (rounding or default) in BY_GPTQ and precision in self.gptq_precisions

    def device_precisions(self) -> tuple[str, ...]:
        """What a device profile may list for this format: the uniform precisions with a nominal size."""
        return tuple(self.nominal_bpw)

    def check_overrides(self, overrides: dict[str, str] | None, matrices: list[str], shapes: dict) -> dict[str, str]:
        """Overrides checked against the model's weight matrices and this format's precisions, normalised."""
        checked = {}
        for name, asked in (overrides or {}).items():
            if name not in matrices:
                hint = "it is not a weight matrix of this model" if name in shapes else "the model has no such tensor"
                example = matrices[0] if matrices else "model.layers.0.mlp.down_proj.weight"
                raise EdgeqError(f"precision override for {name!r}: {hint}; use HF weight names such as {example!r}")
            checked[name] = self.tensor_type(asked)
        return checked

    def tensor_type(self, asked: str) -> str:
        """What one tensor may be stored as (by default: any of the format's precisions)."""
        return self.normalize(asked)

    def stored_once(self, source) -> dict[str, str]:
        """Tensors of `source` a bundle of this format stores as another (follower → leader): a plan gives them one type
        and counts their bytes once. By default none (a tied checkpoint's head is no tensor of its own)."""
        return {}

    def file_overhead(self, source, tensors: int, context: int) -> int:
        """Bytes the model files hold beside the weights (metadata, alignment, tables sized by the `context` the bundle
        is exported for): part of what `--size` bounds."""
        return 0

    def space(self) -> PrecisionSpace:
        raise EdgeqError(f"edgeq cannot plan precisions for the {self.name} format; pass --precision")

    def check_source(self, source) -> None:
        """Refuses, in one line naming the config option, a model this format's runtime cannot compute; called
        before any work or file. By default every supported architecture (`edgeq.architectures`) exports."""

    def read_trace(self, bundle: Path, manifest: dict, trace: Path) -> dict:
        """The runtime's own trace of this bundle (recorded by an app on a device) as time per layer and per operator."""
        if self.trace_reader is None:
            raise EdgeqError(f"the {self.name} format's runtime writes no trace edgeq reads; --etdump reads ExecuTorch's "
                             "ETDump of an executorch bundle")
        module, _, attr = self.trace_reader.partition(":")
        return getattr(import_module(module), attr)(bundle, manifest, trace)

    def converter(self) -> Converter:
        module, _, attr = self.converter_target.partition(":")
        try:
            cls = getattr(import_module(module), attr)
        except ImportError as exc:
            if (exc.name or "").startswith("edgeq"):
                raise  # a bug of ours, not a missing extra
            raise EdgeqError(f"the {self.name} format needs a package that is not installed ({exc.name}); "
                             f"install it with: pip install 'edgeq[{self.name}]'") from exc
        return cls()


def warn_mismatches(log, mismatches: list[dict]) -> None:
    """One summary line for every tensor the file holds at another type than asked (the list is in the manifest)."""
    if mismatches:
        first = mismatches[0]
        log.warning("%d tensors are not the type asked (e.g. %s: asked %s, got %s, %s); see `edgeq inspect`",
                    len(mismatches), first["tensor"], first["asked"], first["got"], first["why"])


def readback(tensors: dict[str, dict], mismatches: list[dict]) -> dict:
    """The manifest fields every converter reports from its written file: per-tensor types and sizes,
    real bits per weight (bytes on disk over weights), and where the file differs from what was asked."""
    bits = sum(t["bytes"] for t in tensors.values()) * 8
    weights = sum(int(np.prod(t["shape"])) for t in tensors.values())
    return {"tensors": tensors, "bits_per_weight": round(bits / max(weights, 1), 3), "mismatches": mismatches}
