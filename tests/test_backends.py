"""One checker for every registered format and its engine, over every supported architecture.

Each format's most exact precision must reproduce the torch reference: logits on the same ids, the
KV cache stepped one token at a time, greedy tokens, streaming text. Every bundle refuses a file that
no longer matches its checksum, and an export interrupted after the converter has written its files
leaves nothing behind. A new format (or architecture) is tested by registering it (or adding its config).
"""
from __future__ import annotations

import numpy as np
import pytest

import edgeq
from edgeq import exporting, registry
from edgeq.intake import open_model
from edgeq.quality import QualityAccumulator
from edgeq.runtimes.torch import TorchEngine

from conftest import build_gemma_tokenizer, build_model, build_sentencepiece_tokenizer

FORMATS = registry.formats.names()
# Every supported family as a tiny random config: name → (transformers class, build_model overrides). Norm gains are
# perturbed (they start at one value), and each config has what makes its family differ: Gemma 3 a sliding layer and
# a global one (window 8, shorter than TEXT) with their own RoPE bases, (1 + w) norms, q/k norms, GeGLU, a tied
# √hidden-scaled embedding and Gemma's tokenizer; Phi-4-mini-style fused projections, partial rotary and LongRoPE
# (TEXT is past its pretraining context of 16, so the long factors apply); SmolLM3 a NoPE fourth layer.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
    "gemma3": ("Gemma3ForCausalLM", dict(
        tokenizer=build_gemma_tokenizer, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        tie_word_embeddings=True, norm_noise=0.1)),
    "phi3": ("Phi3ForCausalLM", dict(
        tokenizer=build_sentencepiece_tokenizer, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_attention_heads=2,
        num_key_value_heads=1, partial_rotary_factor=0.5, original_max_position_embeddings=16, norm_noise=0.1,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
                      "long_factor": [1.5, 2.0, 2.5, 4.0, 7.0, 11.0, 16.0, 24.0]})),
    "smollm3": ("SmolLM3ForCausalLM", dict(num_hidden_layers=4, pad_token_id=0, tie_word_embeddings=True, norm_noise=0.1)),
}
TEXT = np.random.default_rng(0).integers(3, 390, 40).tolist()
# KL bound of the float export against torch: llama.cpp keeps its KV cache in f16, Core ML computes in float16
KL_BOUND = {"gguf": 1e-4, "onnx": 1e-4, "coreml": 1e-3, "executorch": 1e-4}


def _kl(ref, got, window=TEXT):
    acc = QualityAccumulator()
    acc.add(ref, got, window)
    return acc.result(ctx=len(window))


@pytest.fixture(scope="module")
def float_bundles(tmp_path_factory):
    """(format, architecture) → (HF folder, float bundle), exported once per module."""
    root = tmp_path_factory.mktemp("backends")
    made = {}

    def get(fmt, architecture):
        if (fmt, architecture) not in made:
            cls, overrides = ARCHITECTURES[architecture]
            model = build_model(root / architecture, cls, **overrides) if not (root / architecture).exists() else root / architecture
            spec = registry.formats.get(fmt)
            bundle = edgeq.export(model, format=fmt, precision=spec.float_precision, output=root / f"{fmt}-{architecture}", eval_tokens=0)
            made[fmt, architecture] = (model, bundle)
        return made[fmt, architecture]
    return get


def _load(bundle, fmt):
    return edgeq.load(bundle, backend=registry.formats.get(fmt).eval_runtime)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_float_export_reproduces_torch(fmt, architecture, float_bundles):
    model, bundle = float_bundles(fmt, architecture)
    ref = TorchEngine(open_model(model)).score(TEXT)
    with _load(bundle, fmt) as lm:
        engine = lm.engine
        got = np.array(engine.score(TEXT))
        quality = _kl(ref, got)
        assert got.shape == ref.shape
        assert quality.kl < KL_BOUND[fmt] and quality.top1 >= 0.97, quality
        # prefill, then one token at a time through the engine's cache: the rows of one full pass
        engine.reset()
        steps = [np.array(engine.forward(TEXT[:20]))] + [np.array(engine.forward([t])) for t in TEXT[20:]]
        assert _kl(got[19:], np.stack(steps), TEXT[19:]).kl < KL_BOUND[fmt]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_tokens_past_the_window_equal_torch(fmt, architecture, float_bundles):
    """32 greedy steps after a prompt longer than Gemma's window and Phi's pretraining context: sliding layers,
    NoPE layers and the long RoPE factors through each engine's own cache."""
    model, bundle = float_bundles(fmt, architecture)
    prompt = TEXT[:24]
    reference = edgeq.load(model)
    expected = reference.generate_ids(prompt, 32)
    with _load(bundle, fmt) as lm:
        got = lm.generate_ids(prompt, 32)
        if got != expected and fmt == "coreml":  # float16 weights may break a near-tie of the reference either way
            step = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
            logits = reference.engine.score(prompt + expected[:step])[-1]
            assert logits[expected[step]] - logits[got[step]] < 0.02, f"step {step}: not a near-tie"
        else:
            assert got == expected


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_greedy_tokens_and_stream_equal_torch(fmt, architecture, float_bundles):
    model, bundle = float_bundles(fmt, architecture)
    reference = edgeq.load(model)
    prompt = reference.tokenizer.encode_chat([{"role": "user", "content": "Hello fox"}])
    expected = reference.generate_ids(prompt, 24)
    expected_text = reference.generate("Hello fox", max_new_tokens=24)
    with _load(bundle, fmt) as lm:
        assert lm.generate_ids(prompt, 24) == expected
        assert "".join(lm.generate("Hello fox", max_new_tokens=24, stream=True)) == expected_text


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_changed_file_is_refused_by_its_checksum(fmt, float_bundles, tmp_path):
    import shutil

    _, bundle = float_bundles(fmt, "llama")
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    model_file = copy / edgeq.inspect(copy, verify=False)["model_file"]
    target = max((p for p in ([model_file] if model_file.is_file() else model_file.rglob("*")) if p.is_file()), key=lambda p: p.stat().st_size)
    with open(target, "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\x5a" * 16)
    with pytest.raises(edgeq.EdgeqError, match="checksum"):
        _load(copy, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_interrupt_after_conversion_leaves_nothing(fmt, tiny_llama, tmp_path, monkeypatch):
    written = []

    def interrupted(job, stage):
        written.extend(p for p in stage.rglob("*") if p.is_file())
        raise KeyboardInterrupt

    monkeypatch.setattr(exporting, "measure", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        edgeq.export(tiny_llama, format=fmt, precision=registry.formats.get(fmt).float_precision, output=out / "b", eval_tokens=0)
    assert written  # the converter had written its files …
    assert list(out.iterdir()) == []  # … and none of them is left
