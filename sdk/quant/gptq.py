"""GPTQ (Frantar et al., 2022): error-compensating rounding of linear weights from calibration text.

Rounding each weight to its nearest level (even weighted by an importance matrix) keeps every weight
near its own value. GPTQ rounds one input column at a time and moves that column's rounding error
onto the columns not rounded yet, in the proportions the inverse Hessian of the layer's calibration
inputs (X^T X) gives, so what the layer *outputs* on that text moves as little as possible.

Layers go in order, and a layer's linears in the order it calls them: each is measured on the activations
coming out of the linears already rounded, so later ones also absorb what earlier ones lost, and one forward
pass per layer both measures and rounds it. The model's own weights are restored afterwards.
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

from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any, Iterator, MutableMapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import EdgeqError
from ..progress import bar
from .learned import Learner
from .stand_in import StandIn, layers_replaced

DAMPING = 0.01  # of the mean Hessian diagonal, added to it: keeps the inverse stable (the paper's value)
WIDE_DAMPING, TOKENS_PER_INPUT = 0.1, 8  # an input with fewer calibration tokens than 8 per column: see `damping`
LAZY_COLUMNS = 128  # columns updated together before the rest of the matrix sees their error
ROW_CHUNK = 16384  # rows rounded together: a 1536-wide chunk's float32 copies are 100 MB


class Grid(Protocol):
    block: int  # input columns that share a scale

    def scales(self, weights: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        """The scale per row, (rows,), for one block of columns, (rows, block), given per-column importance; or
        several parameters per row, (rows, k), where a block has more (GGUF's K-quants: a super-block's scales,
        minimums and the sub-block scales under them)."""

    def round(self, column: torch.Tensor, scale: torch.Tensor, index: int) -> torch.Tensor:
        """Column `index` of a block on the grid its rows' parameters give it (dequantized values)."""

    def encode(self, rounded: torch.Tensor, scales: torch.Tensor) -> Any:
        """The format's stored form of a rounded (rows, cols) weight and its (rows, blocks[, k]) parameters."""

    def affine(self, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, int, int]:
        """(step, offset, lowest code, highest code) of every weight at its block's (rows, blocks[, k]) parameters: its
        levels are code · step − offset, step and offset (rows, cols) or a number. Learned scales read the levels
        from it (`edgeq.quant.learned`)."""

    def rescaled(self, scales: torch.Tensor, factors: torch.Tensor) -> torch.Tensor | None:
        """The parameters with each block's step times its factor (rows, blocks), stored as the format stores them;
        None where a block's step is not the grid's to change (a scale fixed per row)."""


class Variant(Protocol):
    """A LoRA adapter the rounded base will run with (`edgeq.adapter_set.KeptAdapter` is one)."""

    def targets(self) -> list[str]:
        """The HF weight names it adapts."""

    def factors(self, weight: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B, A, scaling), float32, with scaling · B·A the delta of `weight` in its (rows, cols) layout."""


def damping(tokens: int, width: int) -> float:
    """The damping of a Hessian measured over `tokens` for an input `width` columns wide. With few tokens per column
    (a down_proj 1536-8960 wide on 8192 tokens) GPTQ fits the calibration text's own correlations, and what it wins
    there carries less to other text; more damping gives up some of the fit for what carries over. Narrower inputs,
    with more tokens per column, do as well at the paper's value (bench/README.md, "GPTQ's damping")."""
    return DAMPING if tokens >= TOKENS_PER_INPUT * width else WIDE_DAMPING


def inverse_hessian_factor(hessian: torch.Tensor, damped_by: float = DAMPING) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (damped), H^-1 = UᵀU: row j holds how column j's error spreads to the later columns.

    With P the order-reversing permutation and L the lower Cholesky factor of PHP, U = P·L⁻¹·P (UᵀU = P(LLᵀ)⁻¹P = H⁻¹):
    one Cholesky and one triangular inverse, 2n³/3 flops, where factor → inverse → factor again costs 4n³/3. float32,
    as the GPTQ reference does: the damping keeps the condition number small. Only H's upper triangle is read (PHP's
    lower), which is all BLAS's syrk computes. (At 1.5B the 8960-wide down_proj's factor in float64 was the largest
    cost of the layer: bench/README.md.)
    """
    from scipy.linalg import lapack

    reversed_ = np.asfortranarray(hessian.detach().float().numpy()[::-1, ::-1])
    diagonal = np.arange(len(reversed_))
    dead = diagonal[reversed_[diagonal, diagonal] == 0]  # inputs never active in the calibration text: nothing to compensate through them
    reversed_[dead, dead] = 1.0
    damp = damped_by * reversed_[diagonal, diagonal].mean()
    for _ in range(5):
        damped = reversed_.copy(order="F")
        damped[diagonal, diagonal] += damp
        lower, info = lapack.spotrf(damped, lower=1, clean=1, overwrite_a=1)
        if not info:
            inverse, info = lapack.strtri(lower, lower=1, overwrite_c=1)
            if not info:
                return torch.from_numpy(np.ascontiguousarray(inverse[::-1, ::-1]))
        damp *= 10
    raise ValueError("the calibration Hessian is not positive definite even after damping")


def gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, factor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounds a (rows, cols) weight column by column; returns (rounded weight, scales (rows, cols / block[, k])).
    Of `hessian` only the upper triangle is read. `factor` is `inverse_hessian_factor(hessian)`, given when weights
    that share an input share it. Rows are independent given the Hessian, so a tall weight (a head of 128-262k
    rows) goes `ROW_CHUNK` rows at a time: its float32 working copies are a chunk's, not the whole matrix's."""
    rows, cols = weight.shape
    if cols % grid.block:
        raise ValueError(f"width {cols} is not a multiple of the block {grid.block}")
    factor = inverse_hessian_factor(hessian) if factor is None else factor
    importance = torch.diag(hessian).float()
    rounded = torch.empty(rows, cols)
    scales = []
    for top in range(0, rows, ROW_CHUNK):
        rounded[top:top + ROW_CHUNK], chunk_scales = _gptq_rows(weight[top:top + ROW_CHUNK], factor, importance, grid)
        scales.append(chunk_scales)
    return rounded, torch.cat(scales)


def _gptq_rows(weight: torch.Tensor, factor: torch.Tensor, importance: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of some rows, transposed so each weight column is a contiguous row. The error of each column reaches the
    later ones at three distances: column by column within its grid block, by one matrix product per block within
    the lazy batch, and by one per batch for the rest of the matrix. The same arithmetic as one rank-1 update per
    column, with most of it in matrix products that keep the rows in cache."""
    cols, block = weight.shape[1], grid.block
    w = weight.detach().float().T.contiguous()  # (cols, rows)
    rounded = torch.empty_like(w)
    scales = []
    step = max(LAZY_COLUMNS, block) // block * block
    for start in range(0, cols, step):
        end = min(start + step, cols)
        errors = torch.empty(end - start, w.shape[1])
        for first in range(start, end, block):
            last = first + block
            part, f = w[first:last], factor[first:last, first:last]
            scale = grid.scales(part.T, importance[first:last])
            scales.append(scale)
            for j in range(block):
                q = grid.round(part[j], scale, j)
                rounded[first + j] = q
                error = errors[first - start + j]
                torch.div(part[j] - q, f[j, j], out=error)
                part[j + 1:].addr_(f[j, j + 1:], error, alpha=-1)
            w[last:end].addmm_(factor[first:last, last:end].T, errors[first - start:last - start], alpha=-1)
        w[end:].addmm_(factor[start:end, end:].T, errors, alpha=-1)
    return rounded.T, torch.stack(scales, 1)


def upper_gram(x: torch.Tensor) -> torch.Tensor:
    """The upper triangle (zeros below) of XᵀX over every token of a (tokens, width) activation: all GPTQ reads of a
    Hessian, and all BLAS's syrk computes, at half the flops of a matrix product (at 1.5B, the 8960-wide down_proj's
    sum costs nearly as much as the layer's forward pass)."""
    from scipy.linalg import blas

    rows = x.detach().float().contiguous().numpy()  # read by BLAS as the Fortran-ordered Xᵀ
    return torch.from_numpy(blas.ssyrk(1.0, rows.T, trans=0, lower=0))


def gain(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor, grid: Grid, judged_on: torch.Tensor | None = None) -> float:
    """GPTQ's output error over nearest rounding's on the same grid and Hessian, tr(ΔW H ΔWᵀ) each: how much of a
    tensor's predicted ΔKL (priced by the planner at nearest rounding) is left under GPTQ. With `judged_on` (the
    Hessian, upper triangle, of other tokens than the ones GPTQ rounded for) the errors are those on that text."""
    judge = hessian if judged_on is None else judged_on
    full = judge + judge.triu(1).T  # a Hessian holds its upper triangle
    importance = torch.diag(hessian).float()
    errors = [0.0, 0.0]
    for top in range(0, weight.shape[0], ROW_CHUNK):
        w = weight[top:top + ROW_CHUNK].detach().float()
        nearest = torch.empty_like(w)
        for first in range(0, w.shape[1], grid.block):
            part = w[:, first:first + grid.block]
            scale = grid.scales(part, importance[first:first + grid.block])
            for j in range(grid.block):
                nearest[:, first + j] = grid.round(part[:, j].contiguous(), scale, j)
        for i, other in enumerate((rounded[top:top + ROW_CHUNK], nearest)):
            delta = w - other
            errors[i] += float(((delta @ full) * delta).sum())
    return errors[0] / errors[1] if errors[1] > 0 else 1.0


class _RoundingHooks:
    """Rounds each linear of a layer as the layer's one forward pass reaches it, with the Hessian of the input it is
    called with, then lets it compute with its rounded weight ("true sequential" GPTQ): a linear's Hessian is taken
    on what the linears rounded before it produce, and the pass that measures the Hessians also gives the next
    layer its input. Linears fed the same tensor (q/k/v, gate/up) share its Hessian and inverse factor.

    Pre-hooks go first (before `edgeq.float_model`'s 16-bit casts) and leave a float32 rounded weight in place;
    `restore` puts the model's own weights back."""

    def __init__(self, modules: dict[str, nn.Linear], grids: dict[str, Grid], real: torch.Tensor, results: dict[str, Any],
                 gains: dict[str, float] | None = None, deferred: dict[str, tuple] | None = None):
        self.grids, self.real, self.results, self.gains, self.deferred = grids, real, results, gains, deferred
        self.originals = {name: m.weight.data for name, m in modules.items()}
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (input, Hessian, factor)
        self._handles = [m.register_forward_pre_hook(self._hook(name), prepend=True) for name, m in modules.items()]

    def _hessian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = x[self.real] if not bool(self.real.all()) else x.reshape(-1, x.shape[-1])  # padding is no input to round for
        hessian = upper_gram(tokens) / len(tokens)
        return x, hessian, inverse_hessian_factor(hessian, damping(len(tokens), hessian.shape[0]))

    def _hook(self, name: str):
        def hook(module, inputs):
            self.round(name, module, inputs[0])
        return hook

    def round(self, name: str, module: nn.Linear, x: torch.Tensor) -> None:
        """GPTQ of `module` for its input `x` (batch, tokens, width); its rounded weight takes its place."""
        if self._last is None or self._last[0] is not x:  # holding x keeps its identity from being reused
            self._last = self._hessian(x)
        grid = self.grids[f"{name}.weight"]
        rounded, scales = gptq(module.weight, self._last[1], grid, self._last[2])
        if self.gains is not None:
            self.gains[f"{name}.weight"] = gain(module.weight, rounded, self._last[1], grid)
        if self.deferred is None:
            self.results[f"{name}.weight"] = grid.encode(rounded, scales)
        else:  # learned scales start from it: encoded once they are fitted
            self.deferred[f"{name}.weight"] = (grid, rounded, scales)
        module.weight.data = rounded  # float32: the model's 16-bit weights would round it again

    def restore(self, modules: dict[str, nn.Linear]) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None
        for name, weight in self.originals.items():
            modules[name].weight.data = weight


class _Catcher(StandIn):
    """Stands in for a decoder layer while the model runs once: records what the layer is called with and hands the
    hidden states on unchanged, so catching every layer's inputs costs the embedding lookup, not a forward pass."""

    def __init__(self, layer: nn.Module, calls: list, keep_hidden: bool):
        super().__init__(layer)
        self.calls, self.keep_hidden = calls, keep_hidden

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.keep_hidden:
            self.calls.append((args, kwargs))
        else:
            self.calls.append(((None, *args[1:]) if args else args, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        return hidden


def _batch(windows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows as one batch of ids padded on the right, (windows, longest), and which positions are real: under a
    causal mask a token never sees the padding after it, so its activations are those of its window alone."""
    ids = torch.zeros(len(windows), max(map(len, windows)), dtype=torch.long)
    real = torch.zeros(ids.shape, dtype=torch.bool)
    for row, window in enumerate(windows):
        ids[row, :len(window)] = torch.tensor(window)
        real[row, :len(window)] = True
    return ids, real


def _layer_inputs(model, ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the model passes each decoder layer for a batch of ids: the mask and RoPE tables of that
    layer (Gemma gives sliding and global layers their own). Hidden states are kept for the first layer only; the
    others get theirs from the layer before, rounded."""
    calls: list[tuple[tuple, dict]] = []
    with layers_replaced(model, [_Catcher(layer, calls, i == 0) for i, layer in enumerate(model.model.layers)]):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return calls


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
    def _linear(b: torch.Tensor, a: torch.Tensor, scaling: float, rows: slice):
        def hook(module, inputs, output):
            output[rows] += (scaling * ((inputs[0][rows].float() @ a.T) @ b.T)).to(output.dtype)
            return output
        return hook

    @staticmethod
    def _embedding(b: torch.Tensor, a: torch.Tensor, scaling: float, rows: slice):
        def hook(module, inputs, output):
            delta = scaling * (nn.functional.embedding(inputs[0][rows], b) @ a)
            scale = getattr(module, "embed_scale", None)  # Gemma scales its lookup inside the module
            if isinstance(scale, torch.Tensor):
                delta = delta * scale.to(module.weight.dtype).float()
            output[rows] += delta.to(output.dtype)
            return output
        return hook

    @contextmanager
    def on(self, modules: dict[str, nn.Module], rows: slice = slice(None)) -> Iterator[None]:
        """The LoRA of those of `modules` ({HF weight name: module}) this variant adapts, switched on for the batch's
        `rows` (its stream's)."""
        handles = []
        try:
            for name, module in modules.items():
                if name in self.factors:
                    make = self._embedding if isinstance(module, nn.Embedding) else self._linear
                    handles.append(module.register_forward_hook(make(*self.factors[name], rows)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def first_hidden(self, model, ids: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """The first decoder layer's hidden states for the batch `ids` with this variant on: the base's, unless it
        adapts the embedding."""
        if self.EMBEDDING not in self.factors:
            return base
        with self.on({self.EMBEDDING: model.model.embed_tokens}):
            return _hidden_of(_layer_inputs(model, ids)[0])


def _run(layer: nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
    """The layer's output hidden states for `hidden` with its call's mask and RoPE tables, `weights` (layer-relative
    names) in place of its own where given."""
    args, kwargs = _with_hidden(call, hidden)
    if weights:
        return _hidden(torch.func.functional_call(layer, weights, args, kwargs))
    return _hidden(layer(*args, **kwargs))


def quantize_model(model, windows: list[list[int]], grids: dict[str, Grid], progress: bool | None = None,
                   variants: Sequence[Variant] = (), into: MutableMapping[str, Any] | None = None,
                   gains: dict[str, float] | None = None, learned: bool = False, head_mix=None) -> MutableMapping[str, Any]:
    """GPTQ of every linear weight `grids` names (HF names) of a transformers decoder, layer by layer on `windows`.

    `variants` are LoRA adapters the rounded base will also run with (kept apart from it, switched on at run
    time): the shared base must serve every adapter's activations as well as its own, so each Hessian sums
    X^T X over the base's stream and each variant's (its LoRA on, through the layers already rounded), divided
    by the tokens of all streams. Without variants, only the base's stream. The streams run as one batch, each
    variant's LoRA on its own rows, so one forward pass per layer both measures and rounds it.

    Returns {HF weight name: grid.encode(...)}, set into `into` as each weight is rounded when given (a mapping that
    writes them to disk keeps them out of memory); the model's weights are left as they were. `gains`, when given,
    gets each weight's `gain` (GPTQ's output error over nearest rounding's), for a plan to price GPTQ with. Memory: one layer's
    activations for every token of every stream, and the Hessian of the input being rounded.

    `learned` fits each layer's block scales after GPTQ by `edgeq.quant.learned` (`--effort max`; not with variants).

    `head_mix` (hidden × hidden, symmetric) is given when the head is the embedding table read through a mix
    (`edgeq.quant.rotation.head_mix`): "lm_head.weight" is then the table, rounded for the head's input times the mix,
    which is what the one stored table computes the logits from.
    """
    if learned and variants:
        raise EdgeqError("learned scales (--effort max) are not fitted for a base with kept adapters yet: merge the "
                         "adapter, or use --effort standard with --keep-adapters")
    layers = model.model.layers
    loras = [None, *(_Lora(variant) for variant in variants)]  # None: the base's own stream
    ids, real = _batch(windows)
    rows = [slice(i * len(windows), (i + 1) * len(windows)) for i in range(len(loras))]
    real = real.repeat(len(loras), 1)
    results: MutableMapping[str, Any] = {} if into is None else into
    with torch.no_grad(), bar(len(layers) + 1, "GPTQ + learned scales" if learned else "GPTQ", "layer", progress) as pbar:
        calls = _layer_inputs(model, ids.repeat(len(loras), 1))  # masks and RoPE tables for the whole batch
        first = _hidden_of(calls[0])
        hidden = torch.cat([first[rows[0]] if lora is None else lora.first_hidden(model, ids, first[rows[0]]) for lora in loras])
        learner = Learner(windows, lambda n: _layer_inputs(model, ids[:n]), hidden, real) if learned else None
        for i, layer in enumerate(layers):
            linears = {f"model.layers.{i}.{n}.weight": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            modules = {name.removesuffix(".weight"): m for name, m in linears.items() if name in grids}
            if learner is not None:
                learner.target(partial(_run, layer, calls[i]))
            hooks = _RoundingHooks(modules, grids, real, results, gains, deferred=None if learner is None else {})
            hidden_in = hidden
            try:
                with ExitStack() as stack:
                    for lora, part in zip(loras[1:], rows[1:]):
                        stack.enter_context(lora.on(linears, part))
                    hidden = _run(layer, calls[i], hidden)
            finally:
                hooks.restore(modules)
            if learner is not None:
                hidden = learner.refine(partial(_run, layer, calls[i]), partial(_run, layer, learner.calls[i]),
                                        hooks.deferred, f"model.layers.{i}.", hidden_in, hidden, results)
            pbar.update(1)
        if "lm_head.weight" in grids:  # its input is the final norm's output: no need to compute the logits
            # a LoRA on lm_head changes its output, not its input: each stream's final states are all it needs
            head, x = model.lm_head, model.model.norm(hidden)
            if head_mix is not None:
                table = model.model.embed_tokens.weight
                head = nn.Linear(table.shape[1], table.shape[0], bias=False)
                head.weight = table  # rounded in place and put back by `restore`, as any weight
                x = x.float() @ torch.as_tensor(head_mix, dtype=torch.float32)
            hooks = _RoundingHooks({"lm_head": head}, grids, real, results, gains)
            try:
                hooks.round("lm_head", head, x)
            finally:
                hooks.restore({"lm_head": head})
        pbar.update(1)
    return results
