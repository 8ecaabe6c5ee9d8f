"""How each ExecuTorch precision stores a linear layer's weight: the one table the spec, the converter's rounding and
the read-back share."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Linear:
    """How one precision stores a linear layer's weight: `bits` per weight, `group` inputs per scale (0: one scale per
    output channel), and whether activations are int8 per token at run time (`dynamic`, XNNPACK's qd8 kernels)."""

    bits: int
    group: int
    dynamic: bool

    def nbytes(self, shape) -> int:
        """Codes plus scales as the delegate stores them: int4 packed two to a byte with a bf16 scale per group (XNNPACK's
        blockwise layout), int8 a byte each with a float32 scale per output channel."""
        rows, cols = int(shape[0]), int(np.prod(shape[1:]))
        if self.group:
            return rows * cols * self.bits // 8 + rows * (cols // self.group) * 2
        return rows * cols * self.bits // 8 + rows * 4


LINEARS = {
    "8da4w": Linear(4, 32, True), "8da4w-g64": Linear(4, 64, True), "8da4w-g128": Linear(4, 128, True),
    "8da8w": Linear(8, 0, True),
}
PRECISIONS = (*LINEARS, "fp32")
