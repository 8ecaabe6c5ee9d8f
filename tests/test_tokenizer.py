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


def test_chat_ids_equal_transformers(tiny_llama):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_llama)
    ours = open_model(tiny_llama).chat_tokenizer()
    assert ours.render_chat(MESSAGES) == hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert ours.encode_chat(MESSAGES) == list(hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert ours.encode("plain text 123") == hf("plain text 123")["input_ids"]


def test_stop_ids_include_end_of_turn(tiny_llama):
    spec = open_model(tiny_llama).tokenizer_spec()
    tok = open_model(tiny_llama).chat_tokenizer()
    assert tok.token_id("<|im_end|>") in spec.stop_token_ids
    assert tok.token_id("<|endoftext|>") in spec.stop_token_ids


@pytest.mark.parametrize("text", ["日本語のテキスト 🙂🚀", "Héllo wörld — ünïcode", "plain ascii"])
def test_incremental_decode_joins_to_full_decode(tiny_llama, text):
    tok = open_model(tiny_llama).chat_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    decoder = tok.detokenizer()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_template_is_sandboxed(tmp_path, tiny_llama):
    from edgeq.tokenizer import ChatTokenizer

    from jinja2.exceptions import SecurityError

    spec = open_model(tiny_llama).tokenizer_spec()
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    tok = ChatTokenizer(tiny_llama / "tokenizer.json", spec, evil)
    with pytest.raises(SecurityError):
        tok.render_chat(MESSAGES)
