"""Constrained decoding: a `response_format` or a tool-call grammar becomes a token mask at every step.

Every backend hands its logits to edgeq's own sampler, so masking them there makes the output valid by
construction on llama.cpp, onnxruntime, torch and Core ML alike. The masks come from llguidance
(`pip install 'edgeq[structured]'`): it compiles JSON Schema, regular expressions and Lark grammars (GBNF
through its converter) into an Earley parser over the tokenizer's byte trie. It was chosen over xgrammar
and outlines-core on measurements made on this project's machines (mask time per token at 49k and 152k
vocabularies, JSON Schema coverage): bench/constraint_libraries.py, numbers in bench/README.md.

A schema or grammar is compiled and checked before any token is generated, so one that uses a feature
llguidance does not implement fails with one line naming it instead of producing unchecked output.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from .errors import EdgeqError

INSTALL_HINT = "structured output needs llguidance: pip install 'edgeq[structured]'"

# JSON written as json.dumps writes it (", " and ": ", no newlines). Flexible whitespace lets a small model
# loop on spaces or newlines until max_tokens and never close the object; a schema's own "x-guidance" wins.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

FORMATS = ("json_schema", "json_object", "regex", "grammar", "text")
FORMAT_HELP = ('{"type": "json_schema", "json_schema": {"schema": {...}}}, {"type": "json_object"}, '
               '{"type": "regex", "pattern": "..."} or {"type": "grammar", "syntax": "lark"|"gbnf", "grammar": "..."}')


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise EdgeqError(INSTALL_HINT) from None
    return llguidance


def json_schema_grammar(schema: Any) -> str:
    """The llguidance grammar of a JSON schema (a dict, or True for any JSON value)."""
    ll = _llguidance()
    if not isinstance(schema, (dict, bool)):
        raise EdgeqError(f"a JSON schema must be an object, got {type(schema).__name__}; pass the schema as a dict")
    try:
        return ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)
    except ValueError as exc:
        raise EdgeqError(f"the JSON schema is not usable: {str(exc).splitlines()[0][:200]}") from None


def response_format_grammar(response_format: Any) -> str | None:
    """The llguidance grammar an OpenAI-style `response_format` asks for; None for free text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or response_format.get("type") not in FORMATS:
        raise EdgeqError(f"response_format must be one of {FORMAT_HELP}; got {_short(response_format)}")
    kind = response_format["type"]
    ll = _llguidance()
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise EdgeqError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}; '
                             f"got {_short(spec)}")
        return json_schema_grammar(spec["schema"])
    if kind == "regex":
        pattern = response_format.get("pattern", response_format.get("regex"))
        if not isinstance(pattern, str) or not pattern:
            raise EdgeqError('response_format regex needs {"type": "regex", "pattern": "..."} with a non-empty pattern')
        return ll.LLMatcher.grammar_from_regex(pattern)
    source, syntax = response_format.get("grammar"), response_format.get("syntax", "lark")
    if not isinstance(source, str) or not source.strip() or syntax not in ("lark", "gbnf"):
        raise EdgeqError('response_format grammar needs {"type": "grammar", "syntax": "lark" or "gbnf", "grammar": "..."}')
    if syntax == "gbnf":
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            source = gbnf_to_lark(source)
        except Exception as exc:  # noqa: BLE001 - the converter raises whatever its parser hit
            raise EdgeqError(f"the GBNF grammar does not parse: {str(exc).splitlines()[0][:200]}") from None
    return ll.LLMatcher.grammar_from_lark(source)


def _short(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


class Vocabulary:
    """A model's tokens as llguidance sees them (built once per model: it indexes every token's bytes).

    `n_vocab` is the width of the engine's logits, which may exceed the tokenizer's (rows padded to a
    multiple of 64 or 128); ids past the tokenizer's are never allowed.
    """

    def __init__(self, tokenizer_json: str, n_vocab: int, stop_ids: list[int]):
        ll = _llguidance()
        self.n_vocab = n_vocab
        try:
            self.tokenizer = ll.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=list(stop_ids) or None)
        except (ValueError, RuntimeError) as exc:
            raise EdgeqError(f"llguidance cannot read this tokenizer ({str(exc).splitlines()[0][:160]}); "
                             "structured output is not available for this model") from None
        self.width = max(self.n_vocab, self.tokenizer.vocab_size)

    def special_token(self, text: str, token_id: int | None) -> bool:
        """Whether `text` is one special token of this vocabulary (a grammar then names it `<text>`)."""
        return token_id is not None and self.tokenizer.is_special_token(token_id)

    def compile(self, grammar: str) -> "Constraint":
        ll = _llguidance()
        is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise EdgeqError(f"the constraint cannot be compiled: {_first_line(messages[0])}")
        return Constraint(self, grammar)


def _first_line(message: str) -> str:
    """llguidance's message on one line: a regex error's echo of the pattern is dropped, its verdict kept."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()] or ["unknown error"]
    verdict = next((line.removeprefix("error: ") for line in lines[1:] if line.startswith("error:")), "")
    line = f"{lines[0]} {verdict}".strip()
    return line if len(line) <= 240 else line[:237] + "..."


class Constraint:
    """A grammar checked against one vocabulary; each generation walks it with a fresh `matcher()`."""

    def __init__(self, vocabulary: Vocabulary, grammar: str):
        self.vocabulary = vocabulary
        self.grammar = grammar

    def matcher(self) -> "Matcher":
        return Matcher(self.vocabulary, self.grammar)


class Matcher:
    """One generation's parse state: masks the logits of each step and advances by the chosen token."""

    def __init__(self, vocabulary: Vocabulary, grammar: str):
        ll = _llguidance()
        self._matcher = ll.LLMatcher(vocabulary.tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise EdgeqError(f"the constraint cannot be compiled: {_first_line(self._matcher.get_error())}")
        self._bits = np.zeros((vocabulary.width + 31) // 32, dtype=np.int32)
        self._width = vocabulary.width

    @property
    def finished(self) -> bool:
        """True when the grammar admits no further token but a stop token (the reply is complete)."""
        return self._matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """Boolean mask over the vocabulary of the tokens the grammar allows next."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)  # drops the GIL
        return np.unpackbits(self._bits.view(np.uint8), count=self._width, bitorder="little").view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar forbids at -inf."""
        allowed = self.allowed()[: logits.shape[-1]]
        return np.where(allowed, logits, np.float32(-np.inf))

    def allows(self, token: int) -> bool:
        """Whether the grammar takes `token` next: one lexer step, far cheaper than the whole mask."""
        return self._matcher.validate_tokens([token]) == 1

    def allowed_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order from the current state, the grammar takes (drafts past that are cut)."""
        return self._matcher.validate_tokens(tokens)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise EdgeqError(f"token {token} broke the constraint ({_first_line(self._matcher.get_error())}); this is a bug in edgeq")
