"""Tokenizer metadata for GGUF: tokens, types, merges or scores, special ids, chat template.

Two vocab kinds, named as llama.cpp names them:
- "gpt2", byte-level BPE (Llama 3, SmolLM2, Qwen): llama.cpp picks its pre-tokenizer (the regex that
  splits text before BPE) by name. A wrong name tokenizes differently from HF and silently undoes a
  fine-tune, so the name is derived from the tokenizer's own pre-tokenizer definition and an unknown
  one is refused.
- "llama", SentencePiece BPE with byte fallback (Llama 2, TinyLlama, Mistral): llama.cpp joins the
  adjacent pair whose joined piece scores highest, so the scores must order joins as HF's merges do.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import gguf

from edgeq.errors import EdgeqError
from edgeq.tokenizer import TURN_END_TOKENS, TokenizerSpec

log = logging.getLogger(__name__)

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

# Normalizer + pre-tokenizer steps of a SentencePiece-style tokenizer → llama.cpp's add_space_prefix.
# llama.cpp, like SentencePiece itself, prefixes "▁" to the text and to the text after each special token.
SPACE_PREFIX = {
    (("Prepend", "▁"), ("Replace", " ", "▁")): True,  # Llama 2, TinyLlama, Mistral as published (HF's legacy form)
    (("Replace", " ", "▁"),): False,
    (("Metaspace", "never"),): False,
    # as transformers saves them: no second "▁" before text that starts with a space and, with "first",
    # none after a special token, where llama.cpp adds one; edgeq's own runtime tokenizes as the original
    (("Metaspace", "always"),): True,
    (("Metaspace", "first"),): True,
    # Gemma as transformers 5 saves it: a Split on " " that finds none once the normalizer replaced every space
    (("Replace", " ", "▁"), ("Split", " ")): False,
}
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def _steps(step: dict | None) -> tuple:
    """A normalizer or pre-tokenizer as comparable (kind, setting) steps."""
    if step is None:
        return ()
    kind = step["type"]
    if kind == "Sequence":
        return tuple(s for p in step.get("pretokenizers", step.get("normalizers")) for s in _steps(p))
    if kind == "Split":
        pattern = step["pattern"]
        return (("Split", pattern.get("Regex", pattern.get("String"))),)
    if kind == "Digits":
        return (("Digits", step.get("individual_digits", False)),)
    if kind == "ByteLevel":
        return (("ByteLevel", step.get("use_regex", True)),)
    if kind == "Metaspace" and step.get("replacement") == "▁" and step.get("split") is False:
        return (("Metaspace", step.get("prepend_scheme", "always")),)
    if kind == "Prepend":
        return (("Prepend", step["prepend"]),)
    if kind == "Replace" and "String" in step["pattern"]:
        return (("Replace", step["pattern"]["String"], step["content"]),)
    return ((kind, json.dumps(step, sort_keys=True)),)


def pre_tokenizer_name(tokenizer: dict) -> str:
    steps = _steps(tokenizer.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(steps)
    if name is None:
        raise EdgeqError(
            f"this tokenizer's pre-tokenizer {[s[0] for s in steps]} has no known llama.cpp equivalent, so GGUF "
            "tokenization would differ from the original; export to ONNX instead or report the model to edgeq"
        )
    return name


def add_space_prefix(tokenizer: dict) -> bool:
    steps = _steps(tokenizer.get("normalizer")) + _steps(tokenizer.get("pre_tokenizer"))
    if steps not in SPACE_PREFIX:
        raise EdgeqError(
            f"this SentencePiece tokenizer's normalizer and pre-tokenizer {[s[0] for s in steps]} have no known llama.cpp "
            "equivalent, so GGUF tokenization would differ from the original; export to ONNX instead or report the model to edgeq"
        )
    if steps[0][0] == "Metaspace" and SPACE_PREFIX[steps]:
        log.warning("llama.cpp's own tokenizer will add a space before text that starts with one%s, where this tokenizer "
                    "does not; edgeq's runtime tokenizes as the original", "" if steps[0][1] == "always" else " or follows a special token")
    return SPACE_PREFIX[steps]


_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
_PHI3_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def general_name(name: str, folder: Path) -> str:
    """`general.name` for a model folder called `name`. llama.cpp keys one tokenizer quirk off this name: in a
    model called "phi3"/"phi-3" every special token strips the spaces after it (as Phi-3's tokenizer.json says),
    and the load fails if any of <unk> <s> </s> <|endoftext|> is missing. So the name says phi3 exactly when the
    tokenizer strips like that, whatever the folder is called."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    specials = [t for t in tokenizer.get("added_tokens", []) if t.get("special")]
    vocab = {**tokenizer["model"].get("vocab", {}), **{t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}}
    strips = any(t.get("rstrip") for t in specials) and all(t in vocab for t in _PHI3_TOKENS)
    if strips:
        return name if _PHI3_NAME.search(name) else f"phi3-{name}"
    return _PHI3_NAME.sub("phi", name)


def write_vocab(writer: gguf.GGUFWriter, folder: Path, spec: TokenizerSpec, chat_template: str | None, n_vocab: int) -> None:
    """Adds the vocab of `folder`'s tokenizer.json as llama.cpp reads it, every special id and the chat template."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    kind = tokenizer["model"]["type"]
    if kind != "BPE":
        raise EdgeqError(
            f"{folder / 'tokenizer.json'} is a {kind} tokenizer, which llama.cpp does not tokenize the same way; "
            "edgeq's GGUF writer handles byte-level and SentencePiece BPE — export this model to ONNX instead"
        )
    if tokenizer["model"].get("byte_fallback"):
        vocab = _write_sentencepiece(writer, tokenizer, folder / "tokenizer.model", spec, n_vocab)
    else:
        vocab = _write_byte_level_bpe(writer, tokenizer, n_vocab)
    _write_special_ids(writer, vocab, spec)
    if chat_template:
        writer.add_chat_template(chat_template)


def _token_table(tokenizer: dict, n_vocab: int) -> tuple[dict[str, int], list[str], list[gguf.TokenType]]:
    """Every token (padded to the embedding's rows) with its type: added tokens are CONTROL or USER_DEFINED."""
    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
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
    return vocab, tokens, types


def _write_byte_level_bpe(writer: gguf.GGUFWriter, tokenizer: dict, n_vocab: int) -> dict[str, int]:
    vocab, tokens, types = _token_table(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"].get("merges", [])])
    return vocab


def _write_sentencepiece(writer: gguf.GGUFWriter, tokenizer: dict, sp_model: Path, spec: TokenizerSpec, n_vocab: int) -> dict[str, int]:
    vocab, tokens, types = _token_table(tokenizer, n_vocab)
    missing = [b for b in BYTE_TOKENS if b not in vocab]
    if missing:
        raise EdgeqError(f"the tokenizer falls back to bytes but has no byte token {missing[0]}; re-save it from the model's tokenizer.model")
    for byte in BYTE_TOKENS:
        types[vocab[byte]] = gguf.TokenType.BYTE
    if spec.unk_token in vocab:
        types[vocab[spec.unk_token]] = gguf.TokenType.UNKNOWN
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(_sentencepiece_scores(tokenizer, vocab, tokens, types, sp_model))
    writer.add_token_types(types)
    writer.add_add_space_prefix(add_space_prefix(tokenizer))
    return vocab


def _sentencepiece_scores(tokenizer: dict, vocab: dict[str, int], tokens: list[str], types: list, sp_model: Path) -> list[float]:
    """The scores of tokenizer.model when it holds the same pieces, else scores derived from the merges."""
    if sp_model.is_file():
        from sentencepiece import SentencePieceProcessor

        try:
            sp = SentencePieceProcessor(model_file=str(sp_model))
        except (OSError, RuntimeError) as exc:
            raise EdgeqError(f"{sp_model} is not a SentencePiece model ({exc}); replace it, or delete it to use tokenizer.json alone") from exc
        n = sp.get_piece_size()
        if n <= len(tokens) and all(sp.id_to_piece(i) == tokens[i] for i in range(n)):
            return [sp.get_score(i) for i in range(n)] + [0.0] * (len(tokens) - n)
        log.info("%s holds other pieces than tokenizer.json; scores come from tokenizer.json's merges", sp_model)
    return _scores_from_merges(tokenizer["model"]["merges"], vocab, tokens, types)


def _scores_from_merges(merge_list: list, vocab: dict[str, int], tokens: list[str], types: list) -> list[float]:
    """Scores that make llama.cpp join pieces in the order of HF's merges: minus the first rank making each piece.

    llama.cpp joins any adjacent pair that forms a piece, best score first; HF joins only listed pairs,
    lowest rank first. The two agree when the merges hold every pair that forms a piece, grouped by
    piece — as HF writes them when it converts a SentencePiece model. Other merge lists are refused.
    """
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merge_list]
    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    grouped = all(first[a + b] <= first[c + d] for (a, b), (c, d) in zip(merges, merges[1:]))
    pairs = set(merges)
    complete = all(
        (piece[:i], piece[i:]) in pairs
        for piece, idx in vocab.items() if types[idx] == gguf.TokenType.NORMAL
        for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
    )
    if not (grouped and complete):
        raise EdgeqError(
            "this SentencePiece-style tokenizer.json's merges are not a converted SentencePiece model's, so llama.cpp "
            "would tokenize differently; put the model's tokenizer.model beside tokenizer.json, or export to ONNX"
        )
    return [-float(first[t]) if t in first else 0.0 for t in tokens]


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
    eot = next((t for t in TURN_END_TOKENS if t in vocab), None)
    if eot is not None:
        writer.add_eot_token_id(vocab[eot])
