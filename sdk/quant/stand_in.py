"""Modules that take a decoder layer's place in a transformers model's own forward loop.

Running the model's own forward (its embedding scale, masks, RoPE tables, final norm, head and any logit
scaling) with some layers stood in for is how GPTQ catches each layer's inputs without a forward pass, and
how sensitivity replays the layers a measurement does not change, without copying any architecture's loop.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


class StandIn(nn.Module):
    """Carries over the layer's plain attributes: the model loop may read them (Gemma's attention_type)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.__dict__.update({k: v for k, v in vars(layer).items() if not k.startswith("_") and k != "training"})


class Replay(StandIn):
    """Returns what the layer returned in an earlier pass over the same ids, whatever it is given."""

    def __init__(self, layer: nn.Module, output):
        super().__init__(layer)
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


class Rounded(StandIn):
    """Runs the layer with each matrix swapped for `rounded(hf_name, weight)` during the call only, so a pass with
    every layer rounded holds one layer's rounded copies at a time."""

    def __init__(self, layer: nn.Module, prefix: str, rounded):
        super().__init__(layer)
        self.layer, self.prefix, self.rounded = layer, prefix, rounded

    def forward(self, *args, **kwargs):
        matrices = [(p, f"{self.prefix}{name}") for name, p in self.layer.named_parameters() if p.ndim == 2]
        saved = [p.data for p, _ in matrices]
        try:
            for p, name in matrices:
                p.data = self.rounded(name, p.data)
            return self.layer(*args, **kwargs)
        finally:
            for (p, _), data in zip(matrices, saved):
                p.data = data


@contextmanager
def layers_replaced(model, layers: list[nn.Module]) -> Iterator[None]:
    """The model with `layers` as its decoder layers for the block; its own ones are put back after."""
    own = model.model.layers
    try:
        model.model.layers = nn.ModuleList(layers)
        yield
    finally:
        model.model.layers = own
