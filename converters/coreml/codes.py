"""The int8 / int4 weights of a Core ML export, written by edgeq into each function's MIL program.

Every function of the package (decode, prefill, and a pair per kept adapter) is traced from the same checkpoint and
holds the same float16 weights. coremltools' `linear_quantize_weights` quantized them again in each function (2 × 128 s
at 1.5B parameters), in numpy's element-by-element float16 arithmetic, on packages saved, reloaded and saved again to
run it. Here the codes are computed once per weight (`coreml_format.linear_codes`: int8 bit for bit coremltools'
values, int4 a least-squares search that min/max rounding loses to) and shared: each function gets them while it is
lowered, as the very ops and dtypes coremltools' pass writes, so the stored layout, its reader and the sharing of
weights across functions are coremltools'. Palettes are still coremltools' own.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from coremltools.converters.mil.mil.passes.pass_registry import register_pass
from coremltools.optimize._utils import infer_block_sizes  # how coremltools' own pass lays a weight's blocks out

from .spec import INT4_BLOCKS, LINEAR_BLOCKS, linear_codes
from .package import weight_ops

log = logging.getLogger(__name__)


def compressor(precision: str):
    """The coremltools op config of a precision name (None: stays float16)."""
    import coremltools.optimize.coreml as cto

    if precision == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0)
    if precision in INT4_BLOCKS:
        return cto.OpLinearQuantizerConfig(mode="linear", dtype="int4", granularity="per_block", block_size=INT4_BLOCKS[precision],
                                           weight_threshold=0)
    if precision.startswith("palettize"):
        return cto.OpPalettizerConfig(mode="kmeans", nbits=int(precision[-1]), granularity="per_grouped_channel",
                                      group_size=16, weight_threshold=0)
    return None


class SharedCodes:
    """The plan's int8 / int4 codes, computed once per HF weight for every function of the export (each holds the
    same float16 weights); `shared_codes` writes them into each function. int4 rounding is weighted by `importance`
    (HF name → mean squared input per column) for the weights it has. GPTQ's codes are set into it
    (`codes[name] = (codes, scales, zero points)`, as `quantize_model` rounds each weight) and taken as they are.

    The codes weigh a byte per weight, and each later function is traced from a float32 decoder of its own (4 bytes
    per weight): held in memory between functions, they set a 3B export's peak (bench/README.md). So they are
    written to `spill` (a folder) as they are computed and memory-mapped only while a function is lowered and
    saved, when its float32 weights are already gone."""

    def __init__(self, plan: dict[str, str], spill: Path, importance: dict[str, np.ndarray] | None = None):
        self.plan = {name: p for name, p in plan.items() if p in LINEAR_BLOCKS}
        self.importance = importance or {}
        self.spill = spill
        self.spilled = 0  # files are numbered, never rewritten: a function may still map an earlier weight's
        self.done: dict[str, tuple] = {}  # HF name → (a sample of the float16 weight or None, its shape, the codes' files)
        self.gptq: set[str] = set()  # HF names whose codes are GPTQ's

    def __setitem__(self, name: str, arrays: tuple) -> None:
        """GPTQ's codes of a weight, written to disk at once: a 3B model's would be 3 GB beside its float model."""
        self.done[name] = (None, arrays[0].shape, self._save(arrays))
        self.gptq.add(name)

    def rounding(self) -> str:
        """How the int4 weights were rounded, for the manifest: by GPTQ, weighted by importance, or to the nearest."""
        int4 = [name for name, p in self.plan.items() if p in INT4_BLOCKS]
        return ("gptq" if self.gptq & set(int4) else "importance-weighted" if set(self.importance) & set(int4)
                else "nearest")

    def apply(self, prog) -> None:
        """Replaces each planned weight's const by `constexpr_blockwise_shift_scale` as coremltools' pass does (same op,
        name, dtypes and layout: what `coreml_package` reads back)."""
        for function in prog.functions.values():
            with function:
                for name, op in weight_ops(function, list(self.plan)).items():
                    if op.op_type == "const" and quantizable(op, name, self.plan[name]):
                        replace_by_codes(op, *self.codes(name, op.outputs[0].val), self.plan[name])

    def codes(self, name: str, value: np.ndarray) -> tuple:
        """(codes, scales, zero points or None) of the weight, computed on its first function and memory-mapped from
        then on; a cheap sample checks a later function holds the same weight."""
        sample = value.reshape(-1)[::max(1, value.size // 4096)].copy()  # a view would keep the whole weight alive
        known = self.done.get(name)
        from_gptq = known is not None and known[0] is None and known[1] == value.shape  # rounded from this weight
        if not from_gptq and (known is None or known[1] != value.shape or not np.array_equal(known[0], sample)):
            self.done[name] = (sample, value.shape, self._save(linear_codes(value, self.plan[name], self.importance.get(name))))
            self.gptq.discard(name)
        return tuple(None if f is None else np.load(f, mmap_mode="r") for f in self.done[name][2])

    def _save(self, arrays: tuple) -> list[Path | None]:
        self.spill.mkdir(exist_ok=True)
        files = []
        for part, array in zip(("codes", "scales", "offsets"), arrays):
            files.append(None if array is None else self.spill / f"{self.spilled}-{part}.npy")
            if array is not None:
                np.save(files[-1], array)
        self.spilled += 1
        return files


@register_pass(namespace="edgeq", override=True)
class shared_codes(AbstractGraphPass):
    """Applies its `codes` option (a `SharedCodes`) as the last pass of a function's lowering, where coremltools' own
    quantizer ran after all of them. The registry keeps this pass for the life of the process, and the codes weigh a
    byte per weight: whoever sets the option clears it after the conversion."""

    def __init__(self):
        super().__init__()
        self.codes: SharedCodes | None = None

    def apply(self, prog) -> None:
        self.codes.apply(prog)


def quantizable(op, name: str, precision: str) -> bool:
    """What coremltools checks before quantizing a const, and which it skips with a warning: infinite values, and a
    width its blocks do not divide. Its axes come from the ops using the weight (a linear's or an embedding's rows
    are output channels): edgeq writes the [1, block] layout those give, and leaves any other as it is."""
    value, block = op.outputs[0].val, LINEAR_BLOCKS[precision]
    if np.isinf(value).any():
        why = "it holds infinite values"
    elif infer_block_sizes(op, compressor(precision), value) != [1, block]:
        why = f"used by {', '.join(sorted({child.op_type for child in op.outputs[0].child_ops}))}, not a linear or embedding"
    elif block and value.shape[1] % block:
        why = f"its width {value.shape[-1]} is not a multiple of {block}"
    else:
        return True
    log.warning("left %s unquantized (%s asked): %s", name, precision, why)
    return False


def replace_by_codes(op, data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, precision: str) -> None:
    """What coremltools' pass does with its values (`_create_constexpr_var`, then removing the const); the const lets
    go of its float16 value at once, as in `lean_fp16_cast`."""
    if precision in INT4_BLOCKS:  # int8 arrays that say they hold int4, as coremltools makes them
        int4 = types.nptype_from_builtin(types.int4)
        data, offset = data.view(int4), offset.view(int4)
    codes = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset, before_op=op, name=op.name + "_quantized")
    block = op.enclosing_block
    block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=codes, no_check_var_types=True)
    block.remove_ops([op])
    for dead in (op.outputs[0], op.val):
        dead._sym_val = None
