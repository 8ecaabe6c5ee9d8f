"""Which constraint library masks edgeq's logits: llguidance, xgrammar or outlines-core, measured here.

For each library and each vocabulary (SmolLM2's 49,152 tokens, and Qwen2.5's 151,665 in a logits row
of 151,936: the tokenizer of the Qwen2.5-Coder model `lib/real_models.py` makes, or when that is not there a
synthetic byte-level BPE grown to that size by merging pairs of SmolLM2 tokens), it reports:
- compile: time from a JSON schema to a ready matcher (first mask included);
- mask time per token: median and p95 of computing the next-token mask while walking a valid
  document token by token (the cost `generate()` pays per decoded token);
- coverage: for each JSON Schema feature, whether the library compiles the schema, accepts a valid
  document and rejects one that breaks only that feature (refusing to compile counts as unsupported;
  compiling but letting the invalid document through counts as "ignored").

    python bench/constraint_libraries.py [--libraries llguidance,xgrammar,outlines-core] [--qwen FOLDER] [--json out.json]

Needs `pip install llguidance xgrammar outlines-core` (xgrammar also torch); a missing library is
reported, not fatal. Exits non-zero when a library that ran masks slower than --bar-us per token
(median, 152k vocabulary) on the timing schema, to catch a regression of the chosen one.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

QWEN_VOCAB = 151_936
REPEATS = 5  # walks of the timing document per library and vocabulary

TIMING_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "email", "tags", "address", "role", "score"],
    "additionalProperties": False,
}
TIMING_DOC = {
    "name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"}, "role": "admin", "score": 0.875,
}

# (feature, schema, a valid document, a document that breaks only that feature)
COVERAGE = [
    ("nested objects", {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {"type": "integer"}}, "required": ["c"], "additionalProperties": False}}, "required": ["b"], "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
     {"a": {"b": {"c": 1}}}, {"a": {"b": {"c": "x"}}}),
    ("array minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [1, 2, 3], [1, 2, 3, 4]),
    ("array minItems (too few)", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [1, 2], [1]),
    ("enum", {"enum": ["red", "green", "blue"]}, "green", "purple"),
    ("const", {"const": "fixed"}, "fixed", "other"),
    ("anyOf", {"anyOf": [{"type": "string"}, {"type": "integer"}]}, 7, True),
    ("oneOf (disjoint)", {"oneOf": [{"type": "string"}, {"type": "integer"}]}, "x", 1.5),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     {"a": 1, "b": "x"}, {"a": 1}),
    ("integer minimum/maximum", {"type": "integer", "minimum": 10, "maximum": 20}, 15, 21),
    ("number exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0, "maximum": 1}, 0.5, 0),
    ("number minimum (negative)", {"type": "number", "minimum": -1.5}, -1.25, -2),
    ("required", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}, {"a": 1, "b": 2}, {"a": 1}),
    ("additionalProperties false", {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}, {"a": 1}, {"a": 1, "z": 2}),
    ("string pattern", {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "ABC-12", "abc-12"),
    ("string minLength/maxLength", {"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    ("format date-time", {"type": "string", "format": "date-time"}, "2024-05-01T12:30:00Z", "yesterday"),
    ("format date", {"type": "string", "format": "date"}, "2024-05-01", "2024-13-45"),
    ("format email", {"type": "string", "format": "email"}, "a@b.org", "not an email"),
    ("format uuid", {"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "123"),
    ("format ipv4", {"type": "string", "format": "ipv4"}, "192.168.0.1", "999.1.1"),
    ("$ref / $defs", {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"], "additionalProperties": False}},
                      "type": "array", "items": {"$ref": "#/$defs/pt"}}, [{"x": 1}], [{"y": 1}]),
    ("type list (nullable)", {"type": ["string", "null"]}, None, 3),
    ("prefixItems (tuple)", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False}, ["a", 1], ["a", "b"]),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 15, 7),
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as one printable character (what byte-level BPE vocabs store)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def grown_tokenizer(smollm_json: str, size: int, seed: int = 0) -> str:
    """SmolLM2's byte-level BPE grown to `size` entries by merging random pairs of its tokens (a Qwen-sized trie)."""
    data = json.loads(smollm_json)
    model = data["model"]
    vocab: dict[str, int] = model["vocab"]
    n_added = len(data["added_tokens"])
    special = {t["content"] for t in data["added_tokens"]}
    words = [t for t in vocab if t not in special]
    rng = random.Random(seed)
    merges = model["merges"]
    as_pairs = bool(merges) and isinstance(merges[0], list)
    next_id = max(max(vocab.values()), max(t["id"] for t in data["added_tokens"])) + 1
    while next_id + n_added < size + n_added and len(vocab) + n_added < size:
        a, b = rng.choice(words), rng.choice(words)
        if a + b in vocab or len(a + b) > 16:
            continue
        vocab[a + b] = next_id
        merges.append([a, b] if as_pairs else f"{a} {b}")
        next_id += 1
    return json.dumps(data)


class Library:
    name = ""

    def mask_bits(self, matcher) -> np.ndarray: ...
    def consume(self, matcher, token: int) -> bool: ...
    def accepting(self, matcher) -> bool: ...

    @staticmethod
    def allowed(bits: np.ndarray, token: int) -> bool:
        return bool((int(bits[token >> 5]) >> (token & 31)) & 1)


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tokenizer_json: str, n_vocab: int, eos: int):
        import llguidance
        import llguidance.numpy as llnp

        self.ll, self.llnp = llguidance, llnp
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=eos)
        self.bits = llnp.allocate_token_bitmask(1, n_vocab)
        self.version = version("llguidance")

    def matcher(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def mask_bits(self, matcher) -> np.ndarray:
        self.llnp.fill_next_token_bitmask(matcher, self.bits)
        return self.bits[0]

    def consume(self, matcher, token):
        return matcher.consume_token(token)

    def accepting(self, matcher):
        return matcher.is_accepting()


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tokenizer_json: str, n_vocab: int, eos: int):
        import xgrammar
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))
        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=n_vocab, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.bits_t = xgrammar.allocate_token_bitmask(1, n_vocab)
        self.bits = self.bits_t.numpy()
        self.eos = eos
        self.version = version("xgrammar")

    def matcher(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=True)
        return self.xgr.GrammarMatcher(compiled)

    def mask_bits(self, matcher):
        matcher.fill_next_token_bitmask(self.bits_t)
        return self.bits[0]

    def consume(self, matcher, token):
        return matcher.accept_token(token)

    def accepting(self, matcher):
        return matcher.accept_token(self.eos)  # the stop token is allowed exactly where the document may end


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tokenizer_json: str, n_vocab: int, eos: int):
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.oc, self.build = outlines_core, build_regex_from_schema
        data = json.loads(tokenizer_json)
        table = {c: b for b, c in bytes_to_unicode().items()}
        specials = {t["id"] for t in data["added_tokens"]}
        by_bytes: dict[bytes, list[int]] = {}
        for token, i in data["model"]["vocab"].items():
            if i in specials or i == eos:
                continue
            by_bytes.setdefault(bytes(table[c] for c in token), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, by_bytes)
        self.bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self.eos = eos
        self.version = version("outlines-core")

    def matcher(self, schema: dict):
        index = self.oc.Index(self.build(json.dumps(schema)), self.vocabulary)
        return self.oc.Guide(index)

    def mask_bits(self, matcher):
        matcher.write_mask_into(self.bits.ctypes.data, self.bits.size, 4)
        return self.bits

    def consume(self, matcher, token):
        try:
            matcher.advance(token, return_tokens=False)
            return True
        except Exception:
            return False

    def accepting(self, matcher):
        return matcher.is_finished() or self.eos in matcher.get_tokens()


LIBRARIES = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


def walk(lib: Library, matcher, tokens: list[int], timings: list[float] | None = None) -> bool:
    """Feeds `tokens` through the matcher, masking before each; True when every token was allowed and the end accepts."""
    for token in tokens:
        start = time.perf_counter()
        bits = lib.mask_bits(matcher)
        if timings is not None:
            timings.append(time.perf_counter() - start)
        if not lib.allowed(bits, token) or not lib.consume(matcher, token):
            return False
    return lib.accepting(matcher)


def measure(lib: Library, encode) -> dict:
    doc = json.dumps(TIMING_DOC, separators=(",", ":"))
    tokens = encode(doc)
    start = time.perf_counter()
    matcher = lib.matcher(TIMING_SCHEMA)
    lib.mask_bits(matcher)
    compile_s = time.perf_counter() - start
    timings: list[float] = []
    ok = all([walk(lib, lib.matcher(TIMING_SCHEMA), tokens, timings) for _ in range(REPEATS)])
    us = sorted(t * 1e6 for t in timings)
    return {"compile_ms": compile_s * 1e3, "mask_us_median": statistics.median(us), "mask_us_p95": us[int(0.95 * (len(us) - 1))],
            "mask_us_mean": statistics.fmean(us), "tokens": len(tokens) * REPEATS, "valid_doc_accepted": ok}


def coverage(lib: Library, encode) -> dict[str, str]:
    out = {}
    for feature, schema, good, bad in COVERAGE:
        try:
            lib.matcher(schema)
        except Exception as exc:  # noqa: BLE001 - every library has its own error types; we only report
            out[feature] = f"refused ({str(exc).splitlines()[0][:80]})"
            continue
        accepts_good = walk(lib, lib.matcher(schema), encode(json.dumps(good, separators=(",", ":"))))
        accepts_bad = walk(lib, lib.matcher(schema), encode(json.dumps(bad, separators=(",", ":"))))
        out[feature] = "yes" if accepts_good and not accepts_bad else ("ignored" if accepts_good else "rejects valid")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--bar-us", type=float, default=1000.0, help="Most median mask time per token allowed (µs, 152k vocab).")
    parser.add_argument("--json", help="Write all results here.")
    parser.add_argument("--qwen", type=Path, help="a Qwen2.5 folder whose tokenizer.json to use (default: qwen-coder-plain if made)")
    args = parser.parse_args()

    from tokenizers import Tokenizer

    from edgeq.default_model import cache_dir, default_model_path

    smollm = (default_model_path() / "tokenizer.json").read_text()
    qwen = args.qwen or cache_dir() / "models" / "qwen2.5-coder-0.5b-instruct"
    big = ("152k (Qwen2.5)", (qwen / "tokenizer.json").read_text()) if (qwen / "tokenizer.json").is_file() else \
        ("152k (grown)", grown_tokenizer(smollm, QWEN_VOCAB))
    vocabs = {"49k (SmolLM2)": smollm, big[0]: big[1]}
    results: dict = {}
    failed = False
    for label, tokenizer_json in vocabs.items():
        tok = Tokenizer.from_str(tokenizer_json)
        n_vocab = max(tok.get_vocab_size(with_added_tokens=True), QWEN_VOCAB if label.startswith("152k") else 0)
        eos = tok.token_to_id("<|im_end|>")

        def encode(text, tok=tok):
            return tok.encode(text, add_special_tokens=False).ids

        for name in args.libraries.split(","):
            try:
                start = time.perf_counter()
                lib = LIBRARIES[name](tokenizer_json, n_vocab, eos)
                setup_s = time.perf_counter() - start
            except ImportError as exc:
                print(f"{name}: not installed ({exc})")
                continue
            row = {"version": lib.version, "vocab": n_vocab, "tokenizer_setup_s": setup_s, **measure(lib, encode)}
            row["coverage"] = coverage(lib, encode)
            results.setdefault(name, {})[label] = row
            supported = sum(v == "yes" for v in row["coverage"].values())
            print(f"{name} {lib.version} {label}: setup {setup_s:.2f} s, compile {row['compile_ms']:.1f} ms, mask/token median "
                  f"{row['mask_us_median']:.0f} µs p95 {row['mask_us_p95']:.0f} µs mean {row['mask_us_mean']:.0f} µs over {row['tokens']} tokens, "
                  f"valid doc accepted {row['valid_doc_accepted']}, coverage {supported}/{len(COVERAGE)}", flush=True)
            if label.startswith("152k") and row["mask_us_median"] > args.bar_us:
                failed = True
    features = [c[0] for c in COVERAGE]
    print(f"\ncoverage ({big[0]} vocabulary):")
    names = [n for n in results]
    print(f"{'feature':30} " + " ".join(f"{n:>16}" for n in names))
    for f in features:
        print(f"{f:30} " + " ".join(f"{results[n].get(big[0], {}).get('coverage', {}).get(f, '-')[:16]:>16}" for n in names))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
