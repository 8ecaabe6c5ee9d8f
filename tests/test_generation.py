"""Sampling, stop strings, sharded checkpoints and --overwrite: behaviour every backend shares."""
from __future__ import annotations

import json

import numpy as np
import pytest

import edgeq
from edgeq.sampling import Sampler, SamplingParams

LOGITS = np.array([0.1, 3.0, 2.9, -1.0, 0.5, 2.0], dtype=np.float32)


def _draws(params: SamplingParams, n: int = 400, seen=None) -> list[int]:
    sampler = Sampler(params)
    return [sampler(LOGITS, seen) for _ in range(n)]


def test_greedy_takes_the_argmax_and_ignores_the_seed():
    assert set(_draws(SamplingParams(temperature=0.0, seed=1), 5)) == {1}


def test_top_k_and_top_p_bound_the_candidates():
    assert set(_draws(SamplingParams(temperature=1.0, top_k=2, seed=0))) == {1, 2}
    # probabilities ∝ exp(logits): tokens 1 and 2 hold ~0.73 of the mass, token 5 brings it past 0.9
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.7, seed=0))) == {1, 2}
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.9, seed=0))) == {1, 2, 5}


def test_the_same_seed_draws_the_same_tokens():
    params = SamplingParams(temperature=1.5, seed=7)
    assert _draws(params) == _draws(params)
    assert _draws(params) != _draws(SamplingParams(temperature=1.5, seed=8))


def test_repetition_penalty_moves_seen_tokens_down():
    assert set(_draws(SamplingParams(repetition_penalty=2.0), 3, seen=np.array([1]))) == {2}


def test_stop_strings_cut_the_text_in_stream_and_whole(tiny_llama):
    with edgeq.load(tiny_llama) as model:
        full = model.generate("Hello fox", max_new_tokens=32)
        assert len(full) > 12
        stop = full[5:9]
        expected = full[: full.find(stop)]
        assert model.generate("Hello fox", max_new_tokens=32, stop=stop) == expected
        assert "".join(model.generate("Hello fox", max_new_tokens=32, stop=[stop, "\x00never"], stream=True)) == expected


def test_sharded_checkpoint_exports_as_one(tmp_path, tiny_llama):
    import transformers

    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.save_pretrained(sharded, max_shard_size="60KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (sharded / name).write_bytes((tiny_llama / name).read_bytes())
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    whole = edgeq.export(tiny_llama, format="gguf", precision="F32", output=tmp_path / "whole", eval_tokens=0)
    parts = edgeq.export(sharded, format="gguf", precision="F32", output=tmp_path / "parts", eval_tokens=0)
    prompt = [3, 50, 70, 90, 110]
    with edgeq.load(whole) as a, edgeq.load(parts) as b:
        np.testing.assert_array_equal(a.engine.score(prompt), b.engine.score(prompt))


def test_overwrite_replaces_a_bundle_whole(tmp_path, tiny_llama):
    out = tmp_path / "b"
    edgeq.export(tiny_llama, format="gguf", precision="Q8_0", output=out, eval_tokens=0)
    with pytest.raises(edgeq.EdgeqError, match="already exists"):
        edgeq.export(tiny_llama, format="gguf", precision="Q4_0", output=out, eval_tokens=0)
    assert edgeq.inspect(out)["precision"] == "Q8_0"
    edgeq.export(tiny_llama, format="gguf", precision="Q4_0", output=out, eval_tokens=0, overwrite=True)
    assert edgeq.inspect(out)["precision"] == "Q4_0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging or old copy beside it
