"""edgeq's own tokenization and chat rendering equal transformers'; streaming never splits a character."""
from __future__ import annotations

import pytest

from edgeq.intake import open_model

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Héllo 🙂, what's 12+30?"},
    {"role": "assistant", "content": "42."},
    {"role": "user", "content": "And in 日本語?"},
]


@pytest.fixture(params=["tiny_llama", "tiny_sentencepiece_llama"])
def model_folder(request):
    """Each test below runs on a byte-level BPE and on a SentencePiece (Llama 2-style) tokenizer."""
    return request.getfixturevalue(request.param)


def test_chat_ids_equal_transformers(model_folder):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_folder)
    ours = open_model(model_folder).chat_tokenizer()
    assert ours.render_chat(MESSAGES) == hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert ours.encode_chat(MESSAGES) == list(hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert ours.encode("plain text 123") == hf("plain text 123")["input_ids"]


def test_bos_is_added_once(tiny_sentencepiece_llama):
    """A SentencePiece Llama adds <s> to a prompt; a chat template that writes <s> itself gets no second one."""
    tok = open_model(tiny_sentencepiece_llama).chat_tokenizer()
    bos = tok.token_id("<s>")
    assert tok.spec.add_bos_token
    assert tok.prompt_ids(prompt="Hello")[:2] == [bos, tok.encode("Hello", add_special_tokens=False)[0]]
    chat = tok.prompt_ids(messages=MESSAGES)
    assert chat[0] == bos and chat.count(bos) == 1


def test_stop_ids_include_end_of_turn(tiny_llama):
    spec = open_model(tiny_llama).tokenizer_spec()
    tok = open_model(tiny_llama).chat_tokenizer()
    assert tok.token_id("<|im_end|>") in spec.stop_token_ids
    assert tok.token_id("<|endoftext|>") in spec.stop_token_ids


@pytest.mark.parametrize("text", ["日本語のテキスト 🙂🚀", "Héllo wörld — ünïcode", "plain ascii", "Ελληνικά ₹ 👩‍💻  x\n\n"])
def test_incremental_decode_joins_to_full_decode(model_folder, text):
    tok = open_model(model_folder).chat_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    decoder = tok.detokenizer()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_byte_fallback_streams_whole_characters(tiny_sentencepiece_llama):
    """The rupee sign is not in the SentencePiece vocab: it arrives as three byte tokens and leaves as one character.
    A byte run that is not UTF-8 streams as the full decode shows it."""
    tok = open_model(tiny_sentencepiece_llama).chat_tokenizer()
    ids = tok.encode("pay ₹5", add_special_tokens=False)
    rupee = [tok.token_id(f"<0x{b:02X}>") for b in "₹".encode()]
    assert rupee[0] in ids and ids[ids.index(rupee[0]):][:3] == rupee
    invalid = [tok.token_id(f"<0x{b:02X}>") for b in b"F\xe0="]
    for ids in (ids, tok.encode("pay", add_special_tokens=False) + invalid + tok.encode(" la", add_special_tokens=False)):
        decoder = tok.detokenizer()
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids)
    assert tok.decode(rupee) == "₹"


def test_template_is_sandboxed(tmp_path, tiny_llama):
    from edgeq import EdgeqError
    from edgeq.tokenizer import ChatTokenizer

    spec = open_model(tiny_llama).tokenizer_spec()
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    tok = ChatTokenizer(tiny_llama / "tokenizer.json", spec, evil)
    with pytest.raises(EdgeqError, match="SecurityError"):
        tok.render_chat(MESSAGES)
