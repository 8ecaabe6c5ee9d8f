"""Gemma 3 270M (real weights) through llama.cpp: F16 quality against transformers, tokenization, chat template and
stop ids in `edgeq run`. Uses the checkpoint bench/lib/gemma3_model.py makes once; skipped (never downloaded) without it."""
from __future__ import annotations

import pytest

import edgeq
from edgeq.default_model import cache_dir
from edgeq.runtimes.llamacpp import LlamaCppEngine

pytestmark = pytest.mark.integration

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Large language models run on phones and laptops.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])",
    "Digits 1234567890, 3.14159 and 2,000,000; dates 2026-11-23; 0x1F and 1e-9.",
    "Unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 🙂🚀👩‍💻, and ∑∫√.",
    "Runs   of    spaces,\ttabs\t\tand\n\n\nnewlines\r\n  indented\n",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
]
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def gemma():
    folder = cache_dir() / "models" / "gemma3-270m-it"
    if not (folder / "config.json").is_file():
        pytest.skip(f"no Gemma 3 270M checkpoint at {folder}; make it once with: cd bench && python -m lib.gemma3_model")
    return folder


@pytest.fixture(scope="module")
def f16_bundle(gemma, tmp_path_factory):
    return edgeq.export(gemma, format="gguf", precision="F16", output=tmp_path_factory.mktemp("g") / "gemma-f16", eval_tokens=0)


def test_f16_gguf_matches_transformers(f16_bundle):
    quality = edgeq.evaluate(f16_bundle, tokens=512, ctx=512, threads=2, progress=False)
    assert quality.kl < 1e-3 and quality.top1 > 0.98, quality


def test_llama_cpp_tokenizes_like_hf(f16_bundle, gemma):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(gemma / "tokenizer.json"))
    with LlamaCppEngine(f16_bundle / "model.gguf", vocab_only=True) as vocab:
        for text in TEXTS:
            for special in (True, False):
                assert vocab.tokenize(text, add_special=special) == hf.encode(text, add_special_tokens=special).ids, text


def test_chat_template_stop_ids_and_edgeq_run(f16_bundle, gemma):
    """The bundle's chat prompt is transformers' own, its stop ids hold <eos> and <end_of_turn>, llama.cpp's metadata
    names them, and `edgeq run` answers with the greedy reply of the float model, stopped where it stops."""
    import gguf
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from edgeq.cli import main

    reference = edgeq.load(gemma)
    hf = AutoTokenizer.from_pretrained(gemma)
    with edgeq.load(f16_bundle) as model:
        tok = model.tokenizer
        ids = tok.encode_chat(MESSAGES)
        assert ids == hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert {tok.token_id("<eos>"), tok.token_id("<end_of_turn>")} <= set(tok.spec.stop_token_ids)
        assert model.generate_ids(ids, 24) == reference.generate_ids(ids, 24)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(f16_bundle / "model.gguf").fields.items()
              if k.startswith("tokenizer.") and k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")}
    assert (fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.eot_token_id"]) == (tok.token_id("<eos>"), tok.token_id("<end_of_turn>"))
    assert fields["tokenizer.chat_template"] == tok.chat_template
    expected = reference.generate(messages=MESSAGES, max_new_tokens=48)
    result = CliRunner().invoke(main, ["run", str(f16_bundle), MESSAGES[0]["content"], "--max-new-tokens", "48", "--threads", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == expected.strip()
