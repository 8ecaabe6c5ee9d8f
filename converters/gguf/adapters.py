"""PEFT LoRA → GGUF LoRA adapter: the file llama.cpp's `llama_adapter_lora_init` loads beside a base GGUF.

The layout is what llama.cpp's loader checks (and its convert_lora_to_gguf.py writes): `general.type` "adapter",
the base's `general.architecture`, `adapter.type` "lora", `adapter.lora.alpha`, and per adapted tensor
`<gguf name>.lora_a` (rank × in) and `<gguf name>.lora_b` (out × rank). For the token embedding the pair is
flipped, as llama.cpp gathers rows of lora_a by token id: lora_a is vocab × rank and lora_b hidden × rank.

llama.cpp scales each pair by alpha / rank, with rank read from lora_b. alpha is written as the adapter's
scaling × its configured rank, so plain LoRA (alpha/r) and rsLoRA (alpha/√r, which llama.cpp's converter
ignores) both come out right; a tensor whose rank or alpha pattern gives it a scaling that single alpha
cannot, carries the difference folded into its lora_b. For Llama the rows of q/k lora_b are permuted as the
base's q/k rows are (llama.cpp rotates adjacent pairs). Factors are written in F16, as llama.cpp's converter does.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from edgeq.adapter_set import KeptAdapter
from edgeq.errors import EdgeqError
from edgeq.intake import SourceModel

from .layout import graph, rope_rows, tensor_plan

ADAPTER_DIR = "adapters"
DTYPE = np.float16


def gguf_alpha(adapter: KeptAdapter) -> float:
    """The one alpha llama.cpp reads: scaling × rank of a module no rank/alpha pattern names."""
    config = adapter.lora.config
    rank = config["r"]
    alpha = config.get("lora_alpha", rank)
    return float(alpha * rank ** 0.5 if config.get("use_rslora") else alpha)


def _pair(source: SourceModel, adapter: KeptAdapter, hf_name: str, alpha: float):
    """(lora_a, lora_b) of one tensor as llama.cpp reads them."""
    b, a, scaling = adapter.factors(hf_name)
    rank = a.shape[0]
    fold = scaling / (alpha / rank)
    if abs(fold - 1.0) > 1e-6:
        b = b * fold
    b = rope_rows(source, hf_name, b)
    if hf_name == "model.embed_tokens.weight":  # gathered by token: lora_a holds a row per token
        return b.numpy(), a.T.contiguous().numpy()
    return a.numpy(), b.numpy()


def write_adapter(source: SourceModel, adapter: KeptAdapter, stage: Path) -> dict:
    """Writes `adapters/<name>.gguf` into the stage; returns its manifest entry (file, alpha, tensors)."""
    names = {hf: name for hf, name, _ in tensor_plan(source)}
    (stage / ADAPTER_DIR).mkdir(exist_ok=True)
    file = f"{ADAPTER_DIR}/{adapter.name}.gguf"
    alpha = gguf_alpha(adapter)
    writer = gguf.GGUFWriter(stage / file, graph(source).arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(adapter.name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for hf_name in adapter.targets():
        if hf_name not in names:
            raise EdgeqError(f"adapter {adapter.name!r} adapts {hf_name}, which the GGUF base does not hold as a tensor of its own")
        lora_a, lora_b = _pair(source, adapter, hf_name, alpha)
        writer.add_tensor(f"{names[hf_name]}.lora_a", np.ascontiguousarray(lora_a, dtype=DTYPE))
        writer.add_tensor(f"{names[hf_name]}.lora_b", np.ascontiguousarray(lora_b, dtype=DTYPE))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": file, "gguf_alpha": alpha, "dtype": "F16", "bytes": (stage / file).stat().st_size}
