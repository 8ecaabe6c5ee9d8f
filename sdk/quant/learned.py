"""Learned scales (`--effort max`): each decoder layer's block scales fitted to what the float layer outputs.

GPTQ (`edgeq.quant.gptq`) rounds each linear on a quadratic model of that linear's own output, at scales searched
block by block before its codes are known. It cannot see the rest of the layer (attention's softmax and the MLP's gate
act on the linears' outputs together), nor aim the layer back at the float model's hidden states, which the layers
rounded before it have already moved. Here, once GPTQ has rounded a layer, its codes are held and every block's step
(`Grid.affine`) gets a factor, fitted by Adam on the layer's output error against the float layer run on the float
model's own hidden states, then stored in the format's own fields (`Grid.rescaled`: an fp16 or bf16 scale, a K-quant
super-block's d). DWQ (mlx-lm) fits scales the same way, end to end against the float model's logits; layer by layer
it fits in a machine's memory and time at 1-3B.

Fitting each weight's rounding as well (AutoRound's offsets) was tried: on this many calibration tokens it halved the
error on the windows it learned from and raised it on the others (bench/README.md, issue 29).

The fit runs on the first calibration windows (`TRAIN_TOKENS`); it is kept only if it lowers the layer's output error
over every window of the calibration text, so `max` is never worse than `standard` on that text, layer by layer.
"""
from __future__ import annotations

from typing import Callable

import torch

ITERATIONS = 20          # Adam steps per layer
TRAIN_TOKENS = 2048      # calibration tokens each step runs (whole windows, the first ones)
LEARNING_RATE = 2e-3     # Adam's, on factors of about 1: a few percent of a scale over the descent

Run = Callable[[torch.Tensor, dict], torch.Tensor]  # (hidden states in, {layer-relative weight name: tensor}) -> out


class _Scales:
    """One linear's block scales as factors over GPTQ's, with GPTQ's codes held: the weight is code · step · factor −
    offset, continuous in the factors."""

    def __init__(self, grid, rounded: torch.Tensor, scales: torch.Tensor):
        self.grid, self.scales = grid, scales
        step, self.low, lo, hi = grid.affine(scales)
        inverse = torch.where(step == 0, torch.zeros_like(step), 1 / step)
        self.codes = ((rounded + self.low) * inverse).round_().clamp_(lo, hi)
        self.step = step
        self.factors = torch.ones(rounded.shape[0], rounded.shape[1] // grid.block, requires_grad=True)

    def levels(self) -> torch.Tensor:
        return self.codes * self.step * self.factors.repeat_interleave(self.grid.block, 1) - self.low

    def final(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, scales) with the factors stored in the format's own fields (`Grid.rescaled`), the weight rounded
        by the format's own `Grid.round` column by column: what the converter writes."""
        scales = self.grid.rescaled(self.scales, self.factors.detach())
        step, low, _, _ = self.grid.affine(scales)
        levels = self.codes * step - low
        block = self.grid.block
        out = torch.empty_like(levels)
        for first in range(0, levels.shape[1], block):
            scale = scales[:, first // block]
            for j in range(block):
                out[:, first + j] = self.grid.round(levels[:, first + j].contiguous(), scale, j)
        return out, scales


def _error(out: torch.Tensor, target: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a layer's output over the real (unpadded) tokens."""
    return (out - target).square().sum(-1)[real].mean()


def _refine(run: Run, train_run: Run, kept: dict[str, tuple], inputs: tuple[torch.Tensor, torch.Tensor],
            targets: tuple[torch.Tensor, torch.Tensor], gptq_output: torch.Tensor,
            real: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict[str, tuple], torch.Tensor]:
    """Learned scales of one layer. `kept` maps layer-relative weight names to (grid, GPTQ's rounded weight, its
    scales); `inputs`, `targets` and `real` are (every window, the training windows): the rounded model's hidden
    states into the layer, the float layer's output on the float model's own, and which tokens are real.
    `run`/`train_run` run the layer on every window / the training windows with the given weights in place.

    Returns ({name: (rounded weight, scales)}, the layer's output on every window): the learned scales', or GPTQ's
    when the learned ones do not lower the error over every window."""
    gptq_weights = {name: (rounded, scales) for name, (_, rounded, scales) in kept.items()}
    learners = {name: _Scales(grid, rounded, scales) for name, (grid, rounded, scales) in kept.items()
                if grid.rescaled(scales, torch.ones(scales.shape[:2])) is not None}
    if not learners:
        return gptq_weights, gptq_output
    factors = [learner.factors for learner in learners.values()]
    optimizer = torch.optim.Adam(factors, lr=LEARNING_RATE)
    best, best_loss = [f.detach().clone() for f in factors], float("inf")
    for step in range(ITERATIONS + 1):
        with torch.enable_grad():
            loss = _error(train_run(inputs[1], {name: learner.levels() for name, learner in learners.items()}), targets[1], real[1])
            if float(loss.detach()) < best_loss:  # the factors this loss was measured at
                best_loss, best = float(loss.detach()), [f.detach().clone() for f in factors]
            if step == ITERATIONS:
                break
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    with torch.no_grad():
        for value, kept_value in zip(factors, best):
            value.copy_(kept_value)
        learned = {**gptq_weights, **{name: learner.final() for name, learner in learners.items()}}
        output = run(inputs[0], {name: weight for name, (weight, _) in learned.items()})
        if _error(output, targets[0], real[0]) < _error(gptq_output, targets[0], real[0]):
            return learned, output
    return gptq_weights, gptq_output


class Learner:
    """What learned scales carry from layer to layer of `edgeq.quant.gptq.quantize_model`: the float model's own
    hidden states (each layer's target is the float layer run on them) and the training windows' layer inputs."""

    def __init__(self, windows: list[list[int]], layer_inputs: Callable[[int], list], first_hidden: torch.Tensor,
                 real: torch.Tensor):
        self.train = 1
        while self.train < len(windows) and sum(map(len, windows[:self.train + 1])) <= TRAIN_TOKENS:
            self.train += 1
        self.calls = layer_inputs(self.train)  # masks and RoPE tables for the training windows alone
        self.float_hidden, self.real = first_hidden, real

    def target(self, run_float: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Runs the float layer on the float model's hidden states: the layer's target, and the next layer's input."""
        self.float_hidden = run_float(self.float_hidden)

    def refine(self, run: Run, train_run: Run, kept: dict[str, tuple], prefix: str, hidden_in: torch.Tensor,
               gptq_output: torch.Tensor, results) -> torch.Tensor:
        """Learned scales of the layer whose GPTQ results are `kept` ({HF name: (grid, rounded, scales)}), encoded
        into `results`; returns the layer's output with the scales kept."""
        relative = {name.removeprefix(prefix): value for name, value in kept.items()}
        k = self.train
        weights, output = _refine(run, train_run, relative, (hidden_in, hidden_in[:k]),
                                  (self.float_hidden, self.float_hidden[:k]), gptq_output, (self.real, self.real[:k]))
        for name, (grid, _, _) in kept.items():
            results[name] = grid.encode(*weights[name.removeprefix(prefix)])
        return output
