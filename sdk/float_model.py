"""The float model in torch, as every export sees it: the checkpoint with the adapter merged by edgeq.

One loader serves the torch runtime (the reference every format is measured against), the importance
matrix, sensitivity and GPTQ, so all of them run the very tensors the converters write.

Every computation is float32. A float32 copy of a checkpoint stored in 16 bits doubles it, though, which a
1-3B model on a laptop cannot afford beside an export: above `FLOAT32_RESIDENT_BYTES`, the weights stay
in their stored type and each module computes in float32 as it is called (`compute_in_float32`): the
same numbers, at half the memory, paid for by a cast per call that calibration and scoring windows amortize.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

from .checkpoint import check_finite
from .intake import SourceModel

FLOAT32_RESIDENT_BYTES = 4 << 30  # float32 weights beyond this stay 16-bit in memory (a 1B model's, about)
_SIXTEEN_BIT = {"BF16": "bfloat16", "F16": "float16"}


def load_float_model(source: SourceModel, dtype=None):
    """The HF model (float32 by default) with the adapter merged by edgeq's own merge."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # edgeq shows its own progress; a bar per load is noise
    stored = stored_16bit(source) if dtype is None else None
    dtype = stored or dtype or torch.float32
    if source.arch.text_config:
        model = _text_model(source, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, use_safetensors=not source.trust_pickle)
    for name, param in model.named_parameters():  # NaN/inf named here, before any plan or calibration runs on them
        check_finite(name, param.data, source.path)
    if source.adapter:
        if source.config["vocab_size"] != model.config.vocab_size:
            model.resize_token_embeddings(source.config["vocab_size"])
        if source.untied_head:  # the adapter changes the head alone: it gets its own copy of the embedding
            model.config.tie_word_embeddings = False
            model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        with torch.no_grad():
            for name in {*source.adapter.pairs, *source.adapter.replaced}:
                param = model.get_parameter(name)
                param.data = source.tensor(name).to(param.dtype if stored is None else torch.float32)  # merged: float32 kept
    if stored is not None:
        _buffers_as_float32_computes_them(model)
        compute_in_float32(model)
    return model.eval()


def stored_16bit(source: SourceModel):
    """The 16-bit torch dtype every float weight of a large checkpoint is stored in; None when it stays float32."""
    import torch

    types = {t for t in source.dtypes().values() if t.startswith(("F", "BF"))}
    if len(types) != 1 or (kind := _SIXTEEN_BIT.get(types.pop())) is None:
        return None
    parameters = sum(math.prod(shape) for shape in source.shapes().values())
    return getattr(torch, kind) if 4 * parameters > FLOAT32_RESIDENT_BYTES else None


def compute_in_float32(model) -> None:
    """Each module with weights of its own computes in float32: its 16-bit weights are cast for the call and the
    stored ones put back after, so at most one module's float32 copy is ever alive."""
    import torch

    def cast(module, args):
        module._edgeq_stored = {n: p.data for n, p in module.named_parameters(recurse=False) if p.dtype != torch.float32}
        for name, data in module._edgeq_stored.items():
            module._parameters[name].data = data.float()

    def restore(module, args, output):
        for name, data in module.__dict__.pop("_edgeq_stored", {}).items():
            module._parameters[name].data = data

    def lookup_in_float32(module, args, output):
        return output.float()

    for module in model.modules():
        if type(module) is torch.nn.Embedding:  # a lookup is exact in any type: the rows are cast, not the table
            module.register_forward_hook(lookup_in_float32)
        elif any(p.dtype != torch.float32 for p in module.parameters(recurse=False)):
            module.register_forward_pre_hook(cast)
            module.register_forward_hook(restore)


def _buffers_as_float32_computes_them(model) -> None:
    """Buffers a model computes when it is built (RoPE frequencies, Gemma's embedding scale) are rounded when it is
    built in 16 bits: they are taken from a float32 twin built without weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with _weights_on_meta():
        twin = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    for name, buffer in twin.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._buffers and buffer.is_floating_point():
            module._buffers[leaf] = buffer


@contextmanager
def _weights_on_meta():
    """Modules built inside keep their parameters on the meta device (no memory, no initialisation); buffers stay real."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, None if param is None else torch.nn.Parameter(param.to("meta"), requires_grad=False))

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _text_model(source: SourceModel, dtype):
    """The causal LM of a multimodal checkpoint's text model (Gemma 3 4B+): the modules every format exports,
    under the names edgeq gives them (`model.layers.…`, as GPTQ and the adapter merge address them)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    full = getattr(transformers, source.architecture).from_pretrained(source.path, dtype=dtype, use_safetensors=not source.trust_pickle)
    text = full.config.get_text_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text)
    model.model, model.lm_head = full.model.language_model, full.lm_head
    return model


class FloatReference:
    """The float model of one export, opened once on first use and shared: the calibration's importance matrix,
    sensitivity and GPTQ run its torch model, and the quality check scores against its engine. It is as large
    as the model in float32, so nothing loads it until a step needs it, and `release()` lets it go while a
    converter writes (it loads again if a later step asks)."""

    def __init__(self, source: SourceModel):
        self.source = source
        self._engine = None

    @property
    def engine(self):
        """The reference runtime's engine over the float model."""
        if self._engine is None:
            from . import registry

            self._engine = registry.runtimes.get(registry.REFERENCE_RUNTIME)(self.source)
        return self._engine

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    @property
    def model(self):
        """The torch model under the engine."""
        return self.engine.model

    def release(self) -> None:
        if self._engine is not None:
            import gc

            self._engine.close()
            self._engine = None
            gc.collect()
