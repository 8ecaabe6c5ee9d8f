"""LoRA adapters kept apart from a Core ML base: a `prefill_NAME` / `decode_NAME` function pair per adapter in the
one multifunction `.mlpackage`, beside the base's `prefill` / `decode` (an app without adapters sees no change).

Each pair is edgeq's torch decoder traced with LoRA branches on the weights the adapter adapts: a linear computes
`x·Wᵀ + (x·Aᵀ)·(s·B)ᵀ`, the embedding adds the rows of `s·B` gathered by token id times `Aᵀ`. The base weights are
the same float32 tensors in every function and are compressed with the same plan, so they come out as identical
constants, which `save_multifunction` stores once: the package grows by the adapters' factors and the program text
of their functions, not by a second base (the manifest says how much, `weight_bytes` and `program_bytes`).

The factors stay float16 constants, uncompressed: the package computes in float16, they are a few percent of the
base at most, and rounding them to int8 would put quantization error into the very fine-tune a float adapter over
a quantized base is meant to keep. The scaling (α/r, rsLoRA's α/√r, rank and alpha patterns) is folded into B.

Only Apple platforms run the functions; anywhere, `read_lora` reads an adapter function's factors back, which is how
`edgeq.runtimes.coreml.CoreMLTorchEngine` applies them in torch to measure each adapter.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeq.adapter_set import KeptAdapter
from edgeq.errors import EdgeqError

EMBEDDING = "model.embed_tokens.weight"
SPEC_FILE = "Data/com.apple.CoreML/model.mlmodel"  # the package's program: every function's ops
BLOB_HEADER = 64  # weight.bin: each blob is a 64-byte header and its data padded to 64 bytes
FACTORS = ("lora_A", "lora_B")
LORA_NAME = re.compile(r"^(.*?_lora_[AB])(?:_|$)")


def function_name(base: str, adapter: str) -> str:
    """The package function that runs `base` ("prefill" or "decode") with adapter `adapter`: MIL names are identifiers
    (coremltools' own sanitizer), so the '.' and '-' an adapter name may hold become '_' (the manifest records it)."""
    return f"{base}_{re.sub(r'[^A-Za-z0-9_]', '_', adapter)}"


def check_names(adapters: list[KeptAdapter]) -> None:
    """Refuses two adapters whose function names would be one (`a-b` and `a_b`)."""
    seen = {}
    for adapter in adapters:
        other = seen.setdefault(function_name("decode", adapter.name), adapter.name)
        if other != adapter.name:
            raise EdgeqError(f"adapters {other!r} and {adapter.name!r} would both be Core ML function "
                             f"{function_name('decode', adapter.name)!r} (names hold letters, digits and '_'); rename one")


class LoraLinear(nn.Module):
    """A linear layer over the base's own weight (the same Parameter: its op keeps the base's name) plus, when
    `lora_A` is set, `linear(linear(x, A), B)`; without factors it computes exactly what `nn.Linear` does."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = self.lora_B = None

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.lora_A is None:
            return out
        return out + F.linear(F.linear(x, self.lora_A), self.lora_B)


class LoraEmbedding(nn.Module):
    """The token embedding plus, when set, the rows of `lora_A` (vocab × r, s·B) gathered by id, times `lora_B`ᵀ."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.weight = base.weight
        self.lora_A = self.lora_B = None

    def forward(self, ids):
        out = F.embedding(ids, self.weight)
        if self.lora_A is None:
            return out
        return out + F.linear(F.embedding(ids, self.lora_A), self.lora_B)


def factors(adapter: KeptAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name → (lora_A, lora_B) in float32 as the LoRA modules take them, scaling folded into B."""
    out = {}
    for weight in adapter.targets():
        b, a, scaling = adapter.factors(weight)
        b, a = b.float() * scaling, a.float()
        out[weight.removesuffix(".weight")] = (b, a.T.contiguous()) if weight == EMBEDDING else (a, b)
    return out


def _module(decoder, name: str):
    try:
        return decoder.get_submodule(name)
    except AttributeError:
        return None


def lora_modules(decoder, modules) -> dict[str, nn.Module]:
    """Puts a LoRA module (no factors yet) in place of each named linear or embedding of the decoder; returns them."""
    placed = {}
    for module in modules:
        original = _module(decoder, module)
        if isinstance(original, (LoraLinear, LoraEmbedding)):
            placed[module] = original
            continue
        wrapper = {nn.Linear: LoraLinear, nn.Embedding: LoraEmbedding}.get(type(original))
        if wrapper is None:
            raise EdgeqError(f"a kept adapter adapts {module}.weight, which the Core ML decoder does not compute as a "
                             "linear layer or embedding of its own; export that adapter merged instead")
        parent, _, leaf = module.rpartition(".")
        placed[module] = wrapper(original)
        setattr(decoder.get_submodule(parent), leaf, placed[module])
    return placed


def set_factors(placed: dict[str, nn.Module], tensors: dict[str, tuple] | None) -> None:
    """Sets each LoRA module's factors (None for a module `tensors` does not adapt, or for all: the base alone)."""
    for module, lora in placed.items():
        pair = (tensors or {}).get(module)
        lora.lora_A, lora.lora_B = (None, None) if pair is None else (nn.Parameter(t, requires_grad=False) for t in pair)


@contextmanager
def applied(decoder, adapter: KeptAdapter | None):
    """The decoder with `adapter`'s LoRA branches (its float32 factors as parameters named `<module>.lora_A/B`),
    restored to the plain modules afterwards (None: the decoder as it is)."""
    if adapter is None:
        yield decoder
        return
    tensors = factors(adapter)
    originals = {module: _module(decoder, module) for module in tensors}
    try:
        set_factors(lora_modules(decoder, tensors), tensors)
        yield decoder
    finally:
        for module, original in originals.items():
            if original is not None:
                parent, _, leaf = module.rpartition(".")
                setattr(decoder.get_submodule(parent), leaf, original)


def lora_ops(function, modules) -> dict[str, dict[str, object]]:
    """Module name → {"lora_A": const op, "lora_B": const op} of one function (ops keep the parameter's name with
    dots as underscores, plus coremltools' suffixes such as `_to_fp16`)."""
    wanted = {f"{m.replace('.', '_')}_{part}": (m, part) for m in modules for part in FACTORS}
    found: dict[str, dict[str, object]] = {}
    for op in function.operations:
        match = LORA_NAME.match(op.name) if op.op_type == "const" else None
        if match and match.group(1) in wanted:
            module, part = wanted[match.group(1)]
            found.setdefault(module, {})[part] = op
    return found


def read_lora(path: Path, functions: dict[str, str], modules: list[str]) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Adapter name → module → (lora_A, lora_B) as float32, read from each adapter's function (`functions`: adapter
    name → function name) as the package stores them; `modules` are the decoder's candidate module names."""
    from .package import load_program

    _, program = load_program(path)
    out = {}
    for name, function in functions.items():
        if function not in program.functions:
            raise EdgeqError(f"{path} has no function {function!r} for adapter {name!r}; the package is damaged, re-export the bundle")
        pairs = lora_ops(program.functions[function], modules)
        if not pairs or any(len(pair) != 2 for pair in pairs.values()):
            raise EdgeqError(f"{path}: function {function!r} holds no complete LoRA factors for adapter {name!r}; re-export the bundle")
        out[name] = {module: tuple(np.asarray(pair[part].outputs[0].val, dtype=np.float32) for part in FACTORS)
                     for module, pair in pairs.items()}
    return out


def _blob_bytes(op) -> int:
    """What a const takes in weight.bin: its header and its data padded to 64 bytes."""
    var = op.outputs[0]
    data = -(-int(np.prod(var.shape)) * var.dtype.get_bitwidth() // 8)
    return BLOB_HEADER + -(-data // 64) * 64


def records(stage: Path, model_file: str, adapters: list[KeptAdapter]) -> list[dict]:
    """The manifest entries of the kept adapters, read back from the merged package: their functions, the dtype their
    factors are stored in, and what each adds to the package (its factors in weight.bin, its functions' program)."""
    from coremltools.converters.mil.mil import types

    from .package import read_spec, spec_function

    spec = read_spec(stage / model_file)  # types and shapes: no weight of any function is read
    described = {f.name: f for f in spec.description.functions}
    entries = []
    for adapter in adapters:
        names = {base: function_name(base, adapter.name) for base in ("prefill", "decode")}
        modules = [w.removesuffix(".weight") for w in adapter.targets()]
        ops = [op for pair in lora_ops(spec_function(spec.mlProgram.functions[names["decode"]]), modules).values() for op in pair.values()]
        if len(ops) != 2 * len(modules):
            raise EdgeqError(f"adapter {adapter.name!r}: coremltools did not keep its LoRA factors as constants of their own "
                             f"({len(ops)} of {2 * len(modules)} found); rerun with --debug and report it")
        program_bytes = sum(spec.mlProgram.functions[f].ByteSize() + described[f].ByteSize() for f in names.values())
        weight_bytes = sum(_blob_bytes(op) for op in ops)
        dtypes = sorted({types.builtin_to_string(op.outputs[0].dtype) for op in ops})
        entries.append({**adapter.record(), "file": f"{model_file}/{SPEC_FILE}", "functions": names, "dtype": "/".join(dtypes),
                        "bytes": weight_bytes + program_bytes, "weight_bytes": weight_bytes, "program_bytes": program_bytes})
    return entries
