"""GPTQ (Frantar et al., 2022): error-compensating rounding of linear weights from calibration text.

Rounding each weight to its nearest level (even weighted by an importance matrix) keeps every weight
near its own value. GPTQ rounds one input column at a time and moves that column's rounding error
onto the columns not rounded yet, in the proportions the inverse Hessian of the layer's calibration
inputs (X^T X) gives, so what the layer *outputs* on that text moves as little as possible.

Layers go in order, each measured on the activations coming out of the layers already rounded, so
later layers also absorb what earlier ones lost; the model's own weights are restored afterwards.
(What it buys over nearest rounding is measured in bench/README.md, ONNX section.)

With LoRA adapters kept apart from the base (`variants`), one rounded base serves every adapter: at run time
an adapted layer computes Q·x + scaling·B·A·x, with x the *adapted* model's activations, which the base's
calibration never produces. Each layer's Hessian is then the sum of X^T X over the base's stream and every
adapter's (that adapter's LoRA switched on, its hidden states carried through the layers already rounded),
per token of all streams, so the shared rounding is compensated for every way the base will be run.
(Rounding the base for its own activations alone kept less of a fine-tune than merging it then rounding:
bench/README.md, adapters section.)

The levels are the format's: a `Grid` picks each block's scale on the error-updated weights, rounds
columns at it, and encodes the result, so what GPTQ optimized is exactly what the converter writes.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..progress import bar

DAMPING = 0.01  # of the mean Hessian diagonal, added to it: keeps the inverse stable (the paper's value)
LAZY_COLUMNS = 128  # columns updated together before the rest of the matrix sees their error


class Grid(Protocol):
    block: int  # input columns that share a scale

    def scales(self, weights: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        """The scale per row, (rows,), for one block of columns, (rows, block), given per-column importance."""

    def round(self, column: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """A column of weights on the grid of its rows' scales (dequantized values)."""

    def encode(self, rounded: torch.Tensor, scales: torch.Tensor) -> Any:
        """The format's stored form of a rounded (rows, cols) weight and its (rows, blocks) scales."""


class Variant(Protocol):
    """A LoRA adapter the rounded base will run with (`edgeq.adapter_set.KeptAdapter` is one)."""

    def targets(self) -> list[str]:
        """The HF weight names it adapts."""

    def factors(self, weight: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B, A, scaling), float32, with scaling · B·A the delta of `weight` in its (rows, cols) layout."""


def _inverse_hessian_factor(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (damped), H^-1 = UᵀU: row j holds how column j's error spreads to the later columns.

    With P the order-reversing permutation and L the lower Cholesky factor of PHP, U = P·L⁻¹·P (UᵀU = P(LLᵀ)⁻¹P = H⁻¹):
    one Cholesky and one triangular inverse, 2n³/3 flops, where factor → inverse → factor again costs 4n³/3. float32,
    as the GPTQ reference does: the damping keeps the condition number small. (At 1.5B the 8960-wide down_proj's
    factor in float64 was the largest cost of the layer: bench/README.md.)
    """
    from scipy.linalg import lapack

    h = hessian.float().flip(0, 1).contiguous()
    dead = torch.diag(h) == 0  # inputs never active in the calibration text: nothing to compensate through them
    h[dead, dead] = 1.0
    damp = DAMPING * torch.diag(h).mean()
    for _ in range(5):
        damped = h.clone()
        damped.diagonal().add_(damp)
        lower, info = torch.linalg.cholesky_ex(damped)
        if not info:
            inverse, info = lapack.strtri(lower.numpy(), lower=1, overwrite_c=1)
            if not info:
                return torch.from_numpy(inverse).flip(0, 1)
        damp *= 10
    raise ValueError("the calibration Hessian is not positive definite even after damping")


def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounds a (rows, cols) weight column by column; returns (rounded weight, scales (rows, cols / block)).

    The work is transposed, so each weight column is a contiguous row, and the error of each column reaches the
    later ones at three distances: column by column within its grid block, by one matrix product per block within
    the lazy batch, and by one per batch for the rest of the matrix. The same arithmetic as one rank-1 update per
    column, with most of it in matrix products that keep the rows in cache."""
    rows, cols = weight.shape
    block = grid.block
    if cols % block:
        raise ValueError(f"width {cols} is not a multiple of the block {block}")
    w = weight.detach().float().T.contiguous()  # (cols, rows)
    factor = _inverse_hessian_factor(hessian)
    importance = torch.diag(hessian).float()
    rounded = torch.empty_like(w)
    scales = torch.empty(cols // block, rows)
    step = max(LAZY_COLUMNS, block) // block * block
    for start in range(0, cols, step):
        end = min(start + step, cols)
        errors = torch.empty(end - start, rows)
        for first in range(start, end, block):
            last = first + block
            part, f = w[first:last], factor[first:last, first:last]
            scale = grid.scales(part.T, importance[first:last])
            scales[first // block] = scale
            for j in range(block):
                q = grid.round(part[j], scale)
                rounded[first + j] = q
                error = errors[first - start + j]
                torch.div(part[j] - q, f[j, j], out=error)
                part[j + 1:].addr_(f[j, j + 1:], error, alpha=-1)
            w[last:end].addmm_(factor[first:last, last:end].T, errors[first - start:last - start], alpha=-1)
        w[end:].addmm_(factor[start:end, end:].T, errors, alpha=-1)
    return rounded.T.contiguous(), scales.T.contiguous()


class _Gram:
    """Σ XᵀX over every token of the (..., width) activations added, by BLAS's syrk: it computes one triangle of
    the symmetric sum, half the flops of a matrix product (at 1.5B, the 8960-wide down_proj's sum costs nearly as
    much as the layer's forward passes)."""

    def __init__(self):
        self._upper: np.ndarray | None = None  # Fortran-ordered (width, width); its upper triangle is the sum

    def add(self, x: torch.Tensor) -> "_Gram":
        from scipy.linalg import blas

        rows = x.detach().reshape(-1, x.shape[-1]).float().contiguous().numpy()  # (tokens, width), read as Xᵀ by BLAS
        if self._upper is None:
            self._upper = blas.ssyrk(1.0, rows.T, trans=0, lower=0)
        else:
            self._upper = blas.ssyrk(1.0, rows.T, beta=1.0, c=self._upper, trans=0, lower=0, overwrite_c=1)
        return self

    def value(self) -> torch.Tensor:
        upper = torch.from_numpy(self._upper).triu()
        return upper + upper.T - torch.diag(upper.diagonal())


class _HessianHooks:
    """Sums X^T X of the hooked linears' inputs, once per distinct input: linears fed the same tensor
    (q/k/v, gate/up) form a group under the first of them, and share its Hessian."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.sums: dict[str, _Gram] = {}
        self.groups: dict[str, list[str]] = {}
        self._last: tuple[torch.Tensor, str] | None = None
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if self._last is None or self._last[0] is not x:  # holding x keeps its identity from being reused
                self._last = (x, name)
                self.sums.setdefault(name, _Gram()).add(x)
            group = self.groups.setdefault(self._last[1], [])
            if name not in group:
                group.append(name)
        return hook

    def close(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        for handle in self._handles:
            handle.remove()
        self._last = None
        return {name: gram.value() for name, gram in self.sums.items()}, self.groups


class _Catcher(nn.Module):
    """Stands in for a decoder layer while the model runs once: records what the layer is called with and hands the
    hidden states on unchanged, so catching every layer's inputs costs the embedding lookup, not a forward pass.
    The layer's plain attributes (Gemma's attention_type, which the model loop reads) are carried over."""

    def __init__(self, layer: nn.Module, calls: list, keep_hidden: bool):
        super().__init__()
        self.__dict__.update({k: v for k, v in vars(layer).items() if not k.startswith("_") and k != "training"})
        self.calls, self.keep_hidden = calls, keep_hidden

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.keep_hidden:
            self.calls.append((args, kwargs))
        else:
            self.calls.append(((None, *args[1:]) if args else args, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        return hidden


def _layer_inputs(model, windows: list[list[int]]) -> list[list[tuple[tuple, dict]]]:
    """Per window, the (args, kwargs) the model passes each decoder layer: the mask and RoPE tables of that layer
    (Gemma gives sliding and global layers their own). Hidden states are kept for the first layer only; the
    others get theirs from the layer before, rounded."""
    inputs: list[list[tuple[tuple, dict]]] = []
    layers = model.model.layers
    try:
        for window in windows:
            inputs.append([])
            model.model.layers = nn.ModuleList(_Catcher(layer, inputs[-1], i == 0) for i, layer in enumerate(layers))
            model(input_ids=torch.tensor([window]), use_cache=False, logits_to_keep=1)
    finally:
        model.model.layers = layers
    return inputs


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _hidden_of(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call: tuple[tuple, dict], hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _Lora:
    """One variant's LoRA branches, added by forward hooks to the outputs of the modules it adapts while its
    stream runs: a linear's output gains scaling · (x·Aᵀ)·Bᵀ, the embedding's the rows of scaling · B·A its
    ids pick (times the embedding's own scale, where the module applies one, as it does to its table)."""

    EMBEDDING = "model.embed_tokens.weight"

    def __init__(self, variant: Variant):
        self.factors = {name: variant.factors(name) for name in variant.targets()}

    @staticmethod
    def _linear(b: torch.Tensor, a: torch.Tensor, scaling: float):
        def hook(module, inputs, output):
            return output + (scaling * ((inputs[0].float() @ a.T) @ b.T)).to(output.dtype)
        return hook

    @staticmethod
    def _embedding(b: torch.Tensor, a: torch.Tensor, scaling: float):
        def hook(module, inputs, output):
            rows = scaling * (nn.functional.embedding(inputs[0], b) @ a)
            scale = getattr(module, "embed_scale", None)  # Gemma scales its lookup inside the module
            if isinstance(scale, torch.Tensor):
                rows = rows * scale.to(module.weight.dtype).float()
            return output + rows.to(output.dtype)
        return hook

    @contextmanager
    def on(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """The LoRA of those of `modules` ({HF weight name: module}) this variant adapts, switched on."""
        handles = []
        try:
            for name, module in modules.items():
                if name in self.factors:
                    make = self._embedding if isinstance(module, nn.Embedding) else self._linear
                    handles.append(module.register_forward_hook(make(*self.factors[name])))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def first_hidden(self, model, windows: list[list[int]], base: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per window, the first decoder layer's hidden states with this variant on: the base's, unless it adapts the embedding."""
        if self.EMBEDDING not in self.factors:
            return base
        with self.on({self.EMBEDDING: model.model.embed_tokens}):
            return [_hidden_of(window[0]) for window in _layer_inputs(model, windows)]


def _switched(lora: _Lora | None, modules: dict[str, nn.Module]):
    return nullcontext() if lora is None else lora.on(modules)


def _round_group(modules: list[tuple[str, nn.Linear]], hessian: torch.Tensor, grid: Grid, results: dict[str, Any]) -> None:
    """GPTQ of linears that share an input and a grid, as one matrix (their rows stacked: the same result, one pass)."""
    rounded, scales = gptq(torch.cat([m.weight for _, m in modules]), hessian, grid)
    row = 0
    for name, module in modules:
        rows = module.weight.shape[0]
        results[f"{name}.weight"] = grid.encode(rounded[row:row + rows], scales[row:row + rows])
        module.weight.data = rounded[row:row + rows]  # float32, as the next layer must see it (the model may store 16 bits)
        row += rows


def quantize_model(model, windows: list[list[int]], grids: dict[str, Grid], progress: bool | None = None,
                   variants: Sequence[Variant] = ()) -> dict[str, Any]:
    """GPTQ of every linear weight `grids` names (HF names) of a transformers decoder, layer by layer on `windows`.

    `variants` are LoRA adapters the rounded base will also run with (kept apart from it, switched on at run
    time): the shared base must serve every adapter's activations as well as its own, so each Hessian sums
    X^T X over the base's stream and each variant's (its LoRA on, through the layers already rounded), divided
    by the tokens of all streams. Without variants, only the base's stream.

    Returns {HF weight name: grid.encode(...)}; the model's weights are left as they were. Memory: the
    calibration activations of one layer per stream and the Hessians of its linears (not the whole model's).
    """
    layers = model.model.layers
    loras = [None, *(_Lora(variant) for variant in variants)]  # None: the base's own stream
    tokens = sum(len(window) for window in windows) * len(loras)
    results: dict[str, Any] = {}
    with torch.no_grad(), bar(len(layers) + 1, "GPTQ", "layer", progress) as pbar:
        inputs = _layer_inputs(model, windows)  # masks and RoPE tables: the same for every stream
        first = [_hidden_of(window[0]) for window in inputs]
        hidden = [first if lora is None else lora.first_hidden(model, windows, first) for lora in loras]
        for i, layer in enumerate(layers):
            streams = [[_with_hidden(window[i], h) for window, h in zip(inputs, states)] for states in hidden]
            linears = {f"model.layers.{i}.{n}.weight": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            modules = {name.removesuffix(".weight"): m for name, m in linears.items() if name in grids}
            hooks = _HessianHooks(modules)
            try:
                for lora, calls in zip(loras, streams):
                    with _switched(lora, linears):
                        for args, kwargs in calls:
                            layer(*args, **kwargs)
            finally:
                hessians, groups = hooks.close()
            originals = {name: m.weight.data for name, m in modules.items()}
            for leader, names in groups.items():
                for grid in {grids[f"{n}.weight"] for n in names}:  # one GPTQ per grid among the group
                    alike = [(n, modules[n]) for n in names if grids[f"{n}.weight"] == grid]
                    _round_group(alike, hessians[leader] / tokens, grid, results)
            hidden = []
            for lora, calls in zip(loras, streams):
                with _switched(lora, linears):
                    hidden.append([_hidden(layer(*call[0], **call[1])) for call in calls])
            for name, weight in originals.items():
                modules[name].weight.data = weight
            pbar.update(1)
        if "lm_head.weight" in grids:  # its input is the final norm's output: no need to compute the logits
            # a LoRA on lm_head changes its output, not its input: each stream's final states are all it needs
            gram = _Gram()
            for states in hidden:
                for h in states:
                    gram.add(model.model.norm(h))
            hessian = gram.value()
            original = model.lm_head.weight.data
            _round_group([("lm_head", model.lm_head)], hessian / tokens, grids["lm_head.weight"], results)
            model.lm_head.weight.data = original
        pbar.update(1)
    return results
