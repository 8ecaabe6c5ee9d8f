"""Per-family behaviour beyond the shared checker (tests/test_backends.py): what each engine refuses by the option's
name before any file, the text part of a multimodal Gemma 3, LongRoPE's short factors on short sequences, options
one engine computes and another refuses (Phi-3-mini-4k's window), Gemma's tokenizer in llama.cpp."""
from __future__ import annotations

import json

import numpy as np
import pytest

import edgeq
from edgeq import registry
from edgeq.intake import open_model
from edgeq.quality import QualityAccumulator
from edgeq.runtimes.torch import TorchEngine

from conftest import build_gemma_tokenizer, build_model
from test_backends import ARCHITECTURES, TEXT

GEMMA = ARCHITECTURES["gemma3"][1]


def _kl(ref, got) -> float:
    acc = QualityAccumulator()
    acc.add(ref, got, list(range(len(ref))))
    return acc.result(ctx=len(ref)).kl


def _export(model, fmt, out, **kwargs):
    return edgeq.export(model, format=fmt, precision=registry.formats.get(fmt).float_precision, output=out, eval_tokens=0, **kwargs)


def _score(bundle, fmt, tokens, **load):
    with edgeq.load(bundle, backend=registry.formats.get(fmt).eval_runtime, **load) as lm:
        return np.array(lm.engine.score(tokens))


def _model(tmp_path, name, **changes):
    cls, overrides = ARCHITECTURES[name]
    return build_model(tmp_path / name, cls, **{**overrides, **changes})


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("gemma"), "gemma3")


def _config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return folder


@pytest.mark.parametrize("cls, reason", [("Lfm2ForCausalLM", "hybrid"), ("Qwen3NextForCausalLM", "linear-attention"),
                                         ("MixtralForCausalLM", "mixture-of-experts")])
def test_hybrid_recurrent_and_moe_families_are_refused_by_reason(tmp_path, tiny_llama, cls, reason):
    import shutil

    folder = _config(shutil.copytree(tiny_llama, tmp_path / "m"), architectures=[cls])
    with pytest.raises(edgeq.EdgeqError, match=f"{cls} is .*{reason}"):
        open_model(folder)


@pytest.mark.parametrize("changes, option", [
    (dict(num_experts=8), "num_experts = 8"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), "'dynamic'"),
    (dict(hidden_act="relu"), "hidden_act = 'relu'"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),  # transformers' Gemma 3 ignores it: no export could match
])
def test_unsupported_options_are_refused_by_name_before_any_file(tmp_path, tiny_llama, changes, option):
    import shutil

    folder = _config(shutil.copytree(tiny_llama, tmp_path / "m"), **changes)
    out = tmp_path / "out"
    with pytest.raises(edgeq.EdgeqError, match=option):
        _export(folder, "onnx", out)
    assert not out.exists()


@pytest.mark.parametrize("name, changes, fmt, option", [
    ("phi3", dict(sliding_window=16), "gguf", "sliding_window = 16"),      # Phi-3-mini-4k: llama.cpp switched it off
    ("gemma3", dict(query_pre_attn_scalar=24), "gguf", "query_pre_attn_scalar = 24"),
    ("smollm3", dict(no_rope_layers=[1, 0, 1, 1]), "gguf", "no_rope_layers"),
    ("phi3", dict(partial_rotary_factor=0.75), "onnx", "partial_rotary_factor = 0.75"),  # 24 of 32 dims: not a multiple of 16
])
def test_options_an_engine_cannot_compute_are_refused_before_any_file(tmp_path, name, changes, fmt, option):
    if "partial_rotary_factor" in changes:  # set in config.json, without LongRoPE (whose factors count the rotated pairs)
        model = _config(_model(tmp_path, name), rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **changes)
    else:
        model = _model(tmp_path, name, **changes)
    out = tmp_path / "out"
    with pytest.raises(edgeq.EdgeqError, match=option):
        _export(model, fmt, out)
    assert not out.exists()


@pytest.mark.parametrize("fmt", registry.formats.names())
def test_logit_softcapping_and_phi3_window_where_engines_compute_them(tmp_path, fmt):
    """Gemma's final logit cap everywhere (llama.cpp reads it for Gemma 3); Phi-3-mini-4k's window on every layer in
    ONNX (local_window_size) and the Core ML decoder, which GGUF refuses (above)."""
    cases = [("gemma3", dict(final_logit_softcapping=2.0))] + ([("phi3", dict(sliding_window=16))] if fmt != "gguf" else [])
    for name, changes in cases:
        model = _model(tmp_path, name, **changes)
        ref = TorchEngine(open_model(model)).score(TEXT)
        got = _score(_export(model, fmt, tmp_path / f"{name}-{fmt}"), fmt, TEXT)
        assert _kl(ref, got) < (1e-3 if fmt == "coreml" else 1e-4)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_longrope_short_factors_on_sequences_within_the_pretraining_context(tmp_path, fmt):
    """transformers uses the short factors up to original_max_position_embeddings (256 here, llama.cpp pads contexts
    to 256): ONNX chooses per call by the sequence length as transformers does; llama.cpp by the context it is opened
    with, so opened for more than the pretraining context it uses the long factors from the first token."""
    model = _model(tmp_path, "phi3", original_max_position_embeddings=256, max_position_embeddings=1024)
    bundle = _export(model, fmt, tmp_path / fmt)
    ref = TorchEngine(open_model(model)).score(TEXT)
    assert _kl(ref, _score(bundle, fmt, TEXT, n_ctx=256)) < 1e-4
    if fmt == "gguf":
        assert _kl(ref, _score(bundle, fmt, TEXT, n_ctx=1024)) > 1e-3


@pytest.mark.parametrize("fmt", registry.formats.names())
def test_multimodal_gemma3_exports_its_text_model_with_a_note(tmp_path, fmt):
    text = {k: v for k, v in GEMMA.items() if k not in ("tokenizer", "norm_noise")}
    model = build_model(tmp_path / "mm", "Gemma3ForConditionalGeneration", tokenizer=build_gemma_tokenizer, norm_noise=0.1,
                        text_config=text, mm_tokens_per_image=4, image_token_index=5, boi_token_index=6, eoi_token_index=7,
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                           image_size=28, patch_size=14))
    source = open_model(model)
    assert source.family == "gemma3-multimodal" and "model.layers.1.self_attn.q_norm.weight" in source.shapes()
    assert not any("vision" in n for n in source.shapes())
    bundle = _export(model, fmt, tmp_path / fmt)
    assert "vision_tower" in edgeq.inspect(bundle, verify=False)["source"]["dropped"]
    import transformers
    import torch

    full = transformers.Gemma3ForConditionalGeneration.from_pretrained(model).eval()
    with torch.no_grad():
        ref = full(input_ids=torch.tensor([TEXT])).logits[0].numpy()
    assert _kl(ref, _score(bundle, fmt, TEXT)) < (1e-3 if fmt == "coreml" else 1e-4)


def test_llama_cpp_tokenizes_gemma_like_hf_and_carries_its_turn_markers(tmp_path, tiny_gemma):
    from tokenizers import Tokenizer

    import gguf

    from edgeq.runtimes.llamacpp import LlamaCppEngine
    from test_gguf_sentencepiece import TEXTS

    bundle = _export(tiny_gemma, "gguf", tmp_path / "b")
    hf = Tokenizer.from_file(str(tiny_gemma / "tokenizer.json"))
    with LlamaCppEngine(bundle / "model.gguf", vocab_only=True) as vocab:
        for text in TEXTS + ["<start_of_turn>user\n Hi there<end_of_turn>\n<start_of_turn>model\n", " leading space"]:
            for special in (True, False):
                assert vocab.tokenize(text, add_special=special) == hf.encode(text, add_special_tokens=special).ids, text
    fields = {k: f.contents() for k, f in gguf.GGUFReader(bundle / "model.gguf").fields.items()}
    tok = edgeq.load(tiny_gemma).tokenizer
    assert fields["tokenizer.ggml.add_space_prefix"] is False and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.ggml.eot_token_id"] == tok.token_id("<end_of_turn>") in tok.spec.stop_token_ids
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]
    assert (fields["gemma3.rope.freq_base"], fields["gemma3.rope.freq_base_swa"]) == (1000000.0, 10000.0)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_sensitivity_replays_the_layers_before_a_tensor_as_a_full_forward_computes_them(tmp_path, name):
    """A planner's measured KL replays the layers before the rounded tensor's own from the reference pass; it must
    equal the KL of the whole model run with that tensor rounded, in every family (Gemma's logit cap included), for
    the embedding, a layer's weights and the head."""
    import torch

    from edgeq.float_model import load_float_model
    from edgeq.quant.sensitivity import _measure_sample, tensor_kind

    source = open_model(_model(tmp_path, name, **({"final_logit_softcapping": 2.0} if name == "gemma3" else {}),
                               **({} if name == "gemma3" else {"tie_word_embeddings": False})))
    model = load_float_model(source)
    space = registry.formats.get("gguf").space()
    names = [n for n, p in model.named_parameters() if p.ndim == 2 and (".layers.1." in n or ".layers." not in n)]
    tensors = {n: {"kind": tensor_kind(n), "measured": None, "options": {space.candidates(tuple(model.get_parameter(n).shape))[0]: {}}}
               for n in names}
    window = list(range(3, 40))
    assert _measure_sample(model, tensors, space, {}, window, len(tensors), False) == len(tensors)

    ids = torch.tensor([window])
    with torch.inference_mode():
        ref = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for n, info in tensors.items():
            param = model.get_parameter(n)
            saved = param.data
            param.data = torch.from_numpy(space.round_trip(saved.float().numpy(), next(iter(info["options"])), None))
            out = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            param.data = saved
            assert info["measured"] == pytest.approx(max(float((ref.exp() * (ref - out)).sum(-1).mean()), 1e-9), rel=1e-4), n
    assert any(n.startswith("lm_head") for n in names) != (name == "gemma3")  # an untied head, replayed to the end


def test_a_text_familys_name_is_llama_cpps_architecture_name():
    """A GGUF source names its architecture as llama.cpp does; edgeq reads it as the family of that name."""
    from edgeq.architectures import ARCHITECTURES
    from edgeq.converters.gguf.layout import GRAPHS

    assert set(GRAPHS) == set(ARCHITECTURES)
    for family, arch in ARCHITECTURES.items():
        if arch.text_config is None:
            assert GRAPHS[family].arch == family
