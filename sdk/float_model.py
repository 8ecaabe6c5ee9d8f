"""The float model in torch, as every export sees it: the checkpoint with the adapter merged by edgeq.

One loader serves the torch runtime (the reference every format is measured against), the importance
matrix, sensitivity and GPTQ, so all of them run the very tensors the converters write.
"""
from __future__ import annotations

from .checkpoint import check_finite
from .intake import SourceModel


def load_float_model(source: SourceModel, dtype=None):
    """The HF model (float32 by default) with the adapter merged by edgeq's own merge."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # edgeq shows its own progress; a bar per load is noise
    if source.arch.text_config:
        model = _text_model(source, dtype or torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype or torch.float32, use_safetensors=not source.trust_pickle)
    for name, param in model.named_parameters():  # NaN/inf named here, before any plan or calibration runs on them
        check_finite(name, param.data, source.path)
    if source.adapter:
        if source.config["vocab_size"] != model.config.vocab_size:
            model.resize_token_embeddings(source.config["vocab_size"])
        if source.untied_head:  # the adapter changes the head alone: it gets its own copy of the embedding
            model.config.tie_word_embeddings = False
            model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
        state = model.state_dict()
        with torch.no_grad():
            for name in {*source.adapter.pairs, *source.adapter.replaced}:
                state[name].copy_(source.tensor(name))
    return model.eval()


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
