"""GPTQ's rounding written into the GGUF file llama.cpp's quantizer made, tensor by tensor, in place.

llama.cpp's quantizer chooses each tensor's type (the file type's mix, the fallback of a K-quant where a row width is
not a multiple of 256, a plan's overrides) and writes the header. Then every linear weight whose type has a grid
(`blocks.GRIDS`) is rounded by GPTQ (`edgeq.quant.gptq`) on the calibration text, layer by layer, and its bytes, of the
same type and size, are written over the quantizer's as each is rounded. (The quantizer's importance matrix is
measured only when some linear's type has no grid: its bytes are llama.cpp's.) The header is not touched, so the file is as
standard as llama.cpp's own, and the report reads the types back from it as for any export.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from edgeq.errors import EdgeqError

from .blocks import grid_for
from .ggml_quants import TensorEntry, tensor_table
from .spec import FLOAT_TYPES


class BlocksInPlace:
    """GPTQ's results (HF name → (rows, row bytes) uint8, `blocks` layout) written over their tensors' data in the file;
    `arrange` puts a weight's rows in the order the file holds them (llama.cpp's Llama graph interleaves q/k rows)."""

    def __init__(self, path: Path, entries: dict[str, TensorEntry], arrange: Callable[[str, np.ndarray], np.ndarray]):
        self.entries, self.arrange = entries, arrange
        self._file = open(path, "r+b")

    def __setitem__(self, name: str, packed: np.ndarray) -> None:
        entry = self.entries[name]
        data = np.ascontiguousarray(self.arrange(name, packed))
        if data.nbytes != entry.nbytes:  # a grid that disagrees with the type's size would corrupt the file
            raise EdgeqError(f"GPTQ's {entry.type_name} bytes of {name} are {data.nbytes}, the file holds {entry.nbytes}; "
                             "export with --rounding nearest and report it")
        self._file.seek(entry.offset)
        self._file.write(data.tobytes())

    def close(self) -> None:
        self._file.close()


def gptq_grids(path: Path, written: list[tuple[str, str, tuple[int, ...]]]) -> tuple[dict[str, tuple], list[str]]:
    """({HF name: (grid, its tensor entry)}, [HF names]): the linear weights of the decoder layers and the head whose
    type, as the file holds it, has a grid, and the quantized ones whose type has none (they keep the quantizer's bytes)."""
    entries = {e.name: e for e in tensor_table(path)}
    chosen, without = {}, []
    for hf, name, shape in written:
        if not (len(shape) == 2 and hf.endswith(".weight") and (hf.startswith("model.layers.") or hf == "lm_head.weight")):
            continue
        grid = grid_for(entries[name].type_name, shape[-1])
        if grid is not None:
            chosen[hf] = (grid, entries[name])
        elif entries[name].type_name not in FLOAT_TYPES:
            without.append(hf)
    return chosen, without


def round_in_place(path: Path, chosen: dict[str, tuple], calibration, arrange: Callable[[str, np.ndarray], np.ndarray],
                   progress: bool | None, adapters=(), learned: bool = False) -> list[str]:
    """GPTQ of the quantized file at `path`, for the weights `gptq_grids` chose, on `calibration`'s text and float
    model, for the base and every kept adapter's activations; returns the HF names it rounded."""
    from edgeq.quant.effort import require_tokens
    from edgeq.quant.gptq import quantize_model

    if not chosen:
        return []
    require_tokens(calibration, "max" if learned else "standard")
    into = BlocksInPlace(path, {hf: entry for hf, (_, entry) in chosen.items()}, arrange)
    try:
        quantize_model(calibration.model, calibration.windows, {hf: grid for hf, (grid, _) in chosen.items()}, progress,
                       variants=adapters or (), into=into, gains=calibration.gptq_gains, learned=learned)
    finally:
        into.close()
    return sorted(chosen)
