"""Tokenizer metadata for GGUF: tokens, types, merges, special ids, chat template, pre-tokenizer.

llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name. A wrong name
tokenizes differently from HF and silently undoes a fine-tune, so the name is derived from the
tokenizer's own pre-tokenizer definition and an unknown one is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf

from edgeq.errors import EdgeqError
from edgeq.tokenizer import TokenizerSpec

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT_ALT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Pre-tokenizer steps (as HF's tokenizer.json describes them) → llama.cpp pre-tokenizer name.
PRE_TOKENIZERS = {
    (("Digits", True), ("ByteLevel", True)): "smollm",          # SmolLM / SmolLM2
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",  # Llama 3.x
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",      # Qwen2 / 2.5 / 3
    (("Split", _QWEN2_SPLIT_ALT), ("ByteLevel", False)): "qwen2",
    (("ByteLevel", True),): "gpt-2",                            # plain GPT-2 byte level
}


def _steps(pre: dict | None) -> tuple:
    if pre is None:
        return ()
    kind = pre["type"]
    if kind == "Sequence":
        return tuple(s for p in pre["pretokenizers"] for s in _steps(p))
    if kind == "Split":
        pattern = pre["pattern"]
        return (("Split", pattern.get("Regex", pattern.get("String"))),)
    if kind == "Digits":
        return (("Digits", pre.get("individual_digits", False)),)
    if kind == "ByteLevel":
        return (("ByteLevel", pre.get("use_regex", True)),)
    return ((kind, json.dumps(pre, sort_keys=True)),)


def pre_tokenizer_name(tokenizer: dict) -> str:
    steps = _steps(tokenizer.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(steps)
    if name is None:
        raise EdgeqError(
            f"this tokenizer's pre-tokenizer {[s[0] for s in steps]} has no known llama.cpp equivalent, so GGUF "
            "tokenization would differ from the original; export to ONNX instead or report the model to edgeq"
        )
    return name


def write_vocab(writer: gguf.GGUFWriter, tokenizer_json: Path, spec: TokenizerSpec, chat_template: str | None, n_vocab: int) -> None:
    """Adds the byte-level BPE vocab ("gpt2" in llama.cpp terms) and every special id."""
    tokenizer = json.loads(tokenizer_json.read_text())
    model = tokenizer["model"]
    if model["type"] != "BPE" or model.get("byte_fallback"):
        raise EdgeqError(
            f"{tokenizer_json} is a {'SentencePiece-style' if model.get('byte_fallback') else model['type']} tokenizer; "
            "edgeq's GGUF writer handles byte-level BPE (Llama 3, SmolLM2, Qwen) — export to ONNX for this model"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tokenizer.get("added_tokens", [])}
    vocab.update({text: t["id"] for text, t in added.items()})
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, idx in vocab.items():
        if idx >= n_vocab:
            raise EdgeqError(f"token {text!r} has id {idx} but the embedding has {n_vocab} rows; the tokenizer does not belong to this model")
        tokens[idx] = text
        entry = added.get(text)
        if entry is None:
            types[idx] = gguf.TokenType.NORMAL
        else:
            types[idx] = gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _write_special_ids(writer, vocab, spec)
    if chat_template:
        writer.add_chat_template(chat_template)


def _write_special_ids(writer: gguf.GGUFWriter, vocab: dict[str, int], spec: TokenizerSpec) -> None:
    if spec.bos_token in vocab:
        writer.add_bos_token_id(vocab[spec.bos_token])
    if spec.eos_token in vocab:
        writer.add_eos_token_id(vocab[spec.eos_token])
    if spec.pad_token in vocab:
        writer.add_pad_token_id(vocab[spec.pad_token])
    if spec.unk_token in vocab:
        writer.add_unk_token_id(vocab[spec.unk_token])
    writer.add_add_bos_token(spec.add_bos_token)
    writer.add_add_eos_token(False)
    # The end-of-turn token the chat template writes, so llama.cpp stops on it like edgeq does.
    eot = next((t for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>") if t in vocab), None)
    if eot is not None:
        writer.add_eot_token_id(vocab[eot])
