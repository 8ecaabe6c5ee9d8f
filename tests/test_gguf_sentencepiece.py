"""GGUF export of a SentencePiece-style (Llama 2, TinyLlama, Mistral) checkpoint: llama.cpp tokenizes as the
original, greedy tokens equal torch, chat template and stop ids travel, bad vocabularies are refused."""
from __future__ import annotations

import ctypes
import json
import shutil
from contextlib import contextmanager

import gguf
import pytest

import edgeq
from edgeq.converters.gguf.convert import GGUFConverter
from edgeq.converters.gguf.vocab import write_vocab
from edgeq.intake import open_model
from edgeq.runtimes.llamacpp import LlamaCppEngine

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "Digits 1234567890, 3.14159 and 2,000,000; dates 2026-11-23.",
    "Unicode: naïve café, Ελληνικά, русский, 한국어, ₹ and 👩‍💻 need byte fallback.",
    "Runs   of    spaces,\ttabs\t\tand\n\n\nnewlines\r\n  indented\n",
    "",
]
# Where HF's Metaspace pre-tokenizer and llama.cpp part ways (see SPACE_PREFIX in gguf_vocab.py).
SPACE_TEXTS = [" leading space", "  two leading spaces", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<s>Hi</s> there"]
MESSAGES = [{"role": "user", "content": "Hello fox, what is 12+30?"}]
LEGACY_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}


def _copy(model, tmp_path, published=False, tokenizer_model=True):
    """A copy of the checkpoint; `published` rewrites tokenizer.json as Llama 2, TinyLlama and Mistral publish it."""
    folder = shutil.copytree(model, tmp_path / "model")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    if published:
        tokenizer["normalizer"], tokenizer["pre_tokenizer"] = LEGACY_NORMALIZER, None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    if not tokenizer_model:
        (folder / "tokenizer.model").unlink()
    return folder


@contextmanager
def _llama_cpp_warnings():
    """llama.cpp's warning and error lines logged while the block runs."""
    import llama_cpp

    from edgeq.converters.gguf import native

    lines = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            lines.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(native.route_log, ctypes.c_void_p(0))


@pytest.mark.parametrize("published, tokenizer_model", [(True, True), (True, False), (False, True)],
                         ids=["published", "published-merges-only", "saved-by-transformers"])
def test_llama_cpp_tokenizes_like_hf(tmp_path, tiny_sentencepiece_llama, published, tokenizer_model):
    """Scores from tokenizer.model, or derived from the merges without it, make llama.cpp split as HF does;
    byte tokens and "▁" read back as the same text."""
    from tokenizers import Tokenizer

    folder = _copy(tiny_sentencepiece_llama, tmp_path, published, tokenizer_model)
    GGUFConverter().convert(open_model(folder), tmp_path, precision="F32", progress=False)
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with _llama_cpp_warnings() as warnings:
        vocab = LlamaCppEngine(tmp_path / "model.gguf", vocab_only=True)
    assert not warnings
    with vocab:
        for text in TEXTS + (SPACE_TEXTS if published else []):
            for special in (True, False):
                assert vocab.tokenize(text, add_special=special) == hf.encode(text, add_special_tokens=special).ids, text
            ids = vocab.tokenize(text, add_special=False)
            assert vocab.detokenize(ids) == hf.decode(ids, skip_special_tokens=False), text


def test_published_form_tokenizes_like_sentencepiece(tmp_path, tiny_sentencepiece_llama):
    """The published tokenizer.json, SentencePiece itself and llama.cpp agree, leading spaces included."""
    import sentencepiece

    folder = _copy(tiny_sentencepiece_llama, tmp_path, published=True)
    GGUFConverter().convert(open_model(folder), tmp_path, precision="F32", progress=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    with LlamaCppEngine(tmp_path / "model.gguf", vocab_only=True) as vocab:
        for text in TEXTS + SPACE_TEXTS[:2]:
            assert vocab.tokenize(text, add_special=False) == sp.encode(text), text


def test_greedy_tokens_chat_template_and_stop_ids_travel(tmp_path, tiny_sentencepiece_llama):
    bundle = edgeq.export(tiny_sentencepiece_llama, format="gguf", precision="F32", output=tmp_path / "b", eval_tokens=0)
    reference = edgeq.load(tiny_sentencepiece_llama)
    prompt = reference.tokenizer.encode_chat(MESSAGES)
    expected = reference.generate_ids(prompt, 24)
    with edgeq.load(bundle) as model:
        assert model.generate_ids(prompt, 24) == expected
        streamed = list(model.generate(messages=MESSAGES, max_new_tokens=24, stream=True))
        assert "".join(streamed) == model.generate(messages=MESSAGES, max_new_tokens=24)
        assert "".join(streamed) == reference.tokenizer.decode(expected)

    fields = {key: field.contents() for key, field in gguf.GGUFReader(bundle / "model.gguf").fields.items() if key.startswith("tokenizer.")}
    tok = reference.tokenizer
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (tok.token_id("<s>"), tok.token_id("</s>"))
    assert fields["tokenizer.ggml.eot_token_id"] == tok.token_id("<|im_end|>")
    assert {tok.token_id("<|im_end|>"), tok.token_id("</s>")} <= set(tok.spec.stop_token_ids)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(model={"type": "Unigram", "unk_id": 0, "byte_fallback": False,
                               "vocab": [[piece, 0.0] for piece in sorted(t["model"]["vocab"], key=t["model"]["vocab"].get)]}),
     "Unigram tokenizer"),
    (lambda t: t.update(normalizer={"type": "NFKC"}), "normalizer and pre-tokenizer"),
    (lambda t: t["model"]["merges"].pop(5), "merges"),
    (lambda t: t["model"]["vocab"].pop("<0x41>"), "byte token <0x41>"),
])
def test_vocabularies_llama_cpp_cannot_match_are_refused(tmp_path, tiny_sentencepiece_llama, change, message):
    folder = _copy(tiny_sentencepiece_llama, tmp_path, tokenizer_model=False)
    spec = open_model(folder).tokenizer_spec()
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    change(tokenizer)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    writer = gguf.GGUFWriter(tmp_path / "x.gguf", "llama")
    with pytest.raises(edgeq.EdgeqError, match=message):
        write_vocab(writer, folder, spec, None, open_model(folder).vocab_size)
