"""Model intake: what is refused (with an actionable line), and the LoRA merge against PEFT's own."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.intake import open_model

from conftest import build_lora, build_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config(tmp_path, tiny_llama):
    folder = _copy(tiny_llama, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(EdgeqError, match="no config.json"):
        open_model(folder)


def test_unsupported_architecture_named(tmp_path, tiny_llama):
    folder = _copy(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeqError, match="GPTNeoXForCausalLM is not supported; supported: LlamaForCausalLM"):
        open_model(folder)


def test_truncated_safetensors(tmp_path, tiny_llama):
    folder = _copy(tiny_llama, tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(EdgeqError, match="truncated"):
        open_model(folder)


def test_pickle_weights_need_trust(tmp_path, tiny_llama):
    folder = _copy(tiny_llama, tmp_path / "m")
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(EdgeqError, match="--trust-pickle"):
        open_model(folder)
    trusted = open_model(folder, trust_pickle=True)
    assert trusted.tensor("model.embed_tokens.weight").shape[1] == 64


def test_quantized_base_refused(tmp_path, tiny_llama):
    folder = _copy(tiny_llama, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeqError, match="bitsandbytes checkpoint"):
        open_model(folder)


def test_adapter_for_another_base_refused(tmp_path, tiny_lora):
    other = build_model(tmp_path / "other", intermediate_size=96)
    with pytest.raises(EdgeqError, match="trained on"):
        open_model(other, adapter=tiny_lora)


def test_dora_refused(tmp_path, tiny_llama, tiny_lora):
    adapter = _copy(tiny_lora, tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(EdgeqError, match="DoRA"):
        open_model(tiny_llama, adapter=adapter)


def test_merge_equals_peft(tmp_path, tiny_llama, tiny_lora):
    peft = pytest.importorskip("peft")  # optional extra: the check runs wherever peft is installed
    from transformers import AutoModelForCausalLM

    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tiny_lora).merge_and_unload()
    expected = reference.state_dict()
    source = open_model(tiny_llama, adapter=tiny_lora)
    merged = dict(source.tensors())
    assert set(source.adapter.pairs) and all(name in merged for name in source.adapter.pairs)
    for name in source.adapter.pairs:
        torch.testing.assert_close(merged[name].float(), expected[name].float(), atol=1e-5, rtol=0)


def test_modules_to_save_with_resized_embeddings(tmp_path, tiny_llama):
    adapter = build_lora(tmp_path / "a", tiny_llama, modules_to_save=["model.embed_tokens", "lm_head"], extra_rows=8)
    with pytest.raises(EdgeqError, match="ships no tokenizer.json"):
        open_model(tiny_llama, adapter=adapter)
    shutil.copy(tiny_llama / "tokenizer.json", adapter / "tokenizer.json")
    source = open_model(tiny_llama, adapter=adapter)
    base_vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    assert source.config["vocab_size"] == base_vocab + 8
    assert source.tensor("lm_head.weight").shape[0] == base_vocab + 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_found_anywhere(tmp_path, dtype, bad):
    from edgeq.checkpoint import check_finite

    weight = torch.randn(3 << 23).to(dtype)  # more than one slice of 2**24
    weight[(1 << 24) + 7] = bad
    with pytest.raises(EdgeqError, match="NaN or infinite"):
        check_finite("w", weight, tmp_path)


def test_large_finite_weights_whose_sum_overflows_pass(tmp_path):
    from edgeq.checkpoint import check_finite

    check_finite("w", torch.full((1 << 12,), 60000.0, dtype=torch.float16), tmp_path)  # its float16 sum is inf
    check_finite("w", torch.tensor([torch.finfo(torch.float32).max, torch.finfo(torch.float32).max, -1.0]), tmp_path)


def test_checkpoint_digest_is_read_once_until_a_file_changes(tmp_path, monkeypatch):
    import os

    from edgeq import hashing

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    reads = []
    monkeypatch.setattr(hashing, "sha256_files", lambda paths: reads.append(paths) or f"digest-{len(reads)}")
    assert hashing.checkpoint_digest([weights]) == hashing.checkpoint_digest([weights]) == "digest-1"
    weights.write_bytes(b"WEIGHTS" * 1000)  # same size, rewritten: a new modification time
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert hashing.checkpoint_digest([weights]) == "digest-2" and len(reads) == 2
