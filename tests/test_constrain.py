"""response_format: JSON schema, JSON object, regex and grammars, valid by construction on every backend."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

import edgeq
from edgeq.constrain import response_format_grammar

# Every string and number is bounded, so even a random tiny model reaches the end within the budget.
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                      "admin": {"type": "boolean"}}, "required": ["name", "age", "admin"], "additionalProperties": False},
    {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}, "y": {"type": "integer", "minimum": -5, "maximum": 5}},
                  "required": ["x", "y"], "additionalProperties": False},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
        "when": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 1900, "maximum": 2100}]}},
     "required": ["tags", "point", "code", "when"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                                                  "kind": {"const": "item"}}, "required": ["id", "kind"], "additionalProperties": False},
     "minItems": 2, "maxItems": 2},
]


def _format(schema):
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}


def _check_all_schemas(model, seeds=(0, 1)):
    for schema in SCHEMAS:
        for seed in seeds:
            reply = model.chat([{"role": "user", "content": "Give me the data."}], response_format=_format(schema),
                               max_new_tokens=120, temperature=1.0, seed=seed)
            assert reply.finish_reason == "stop", reply
            jsonschema.validate(json.loads(reply.text), schema)


@pytest.fixture(scope="module")
def gguf_bundle(tmp_path_factory, tiny_llama):
    return edgeq.export(tiny_llama, format="gguf", precision="F16", output=tmp_path_factory.mktemp("c") / "gguf", eval_tokens=0)


def test_json_schemas_validate_on_gguf(gguf_bundle):
    with edgeq.load(gguf_bundle) as model:
        _check_all_schemas(model)


def test_json_schemas_validate_on_onnx(tmp_path, tiny_llama):
    pytest.importorskip("onnxruntime")
    bundle = edgeq.export(tiny_llama, format="onnx", precision="fp32", output=tmp_path / "onnx", eval_tokens=0)
    with edgeq.load(bundle) as model:
        _check_all_schemas(model)


def test_json_schemas_validate_on_torch(tiny_llama):
    with edgeq.load(tiny_llama) as model:
        _check_all_schemas(model, seeds=(0,))


def test_json_object_regex_and_grammars(gguf_bundle):
    with edgeq.load(gguf_bundle) as model:
        ask = [{"role": "user", "content": "Hello"}]
        obj = model.chat(ask, response_format={"type": "json_object"}, max_new_tokens=150, temperature=0.7, seed=3)
        if obj.finish_reason == "stop":  # free-form strings may run past the budget on a random model
            assert isinstance(json.loads(obj.text), dict)
        else:
            assert obj.text.startswith("{")
        text = model.generate("Code:", response_format={"type": "regex", "pattern": "[A-Z]{3}-[0-9]{2,4}"}, temperature=1.0, seed=1)
        assert re.fullmatch("[A-Z]{3}-[0-9]{2,4}", text)
        lark = 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]/'
        answer = model.generate("Well?", response_format={"type": "grammar", "syntax": "lark", "grammar": lark}, temperature=1.0, seed=2)
        assert re.fullmatch("yes|no|maybe [0-9]", answer)
        gbnf = 'root ::= "(" [a-c]+ ")"'
        streamed = "".join(model.generate("x", response_format={"type": "grammar", "syntax": "gbnf", "grammar": gbnf}, max_new_tokens=30,
                                          temperature=1.0, seed=4, stream=True))
        assert re.fullmatch(r"\([a-c]+\)", streamed) or re.fullmatch(r"\([a-c]+", streamed)


def test_constrained_stream_equals_whole(gguf_bundle):
    with edgeq.load(gguf_bundle) as model:
        options = dict(response_format=_format(SCHEMAS[1]), max_new_tokens=120, temperature=0.0)
        whole = model.chat([{"role": "user", "content": "hi"}], **options)
        pieces = list(model.chat([{"role": "user", "content": "hi"}], stream=True, **options))
        assert "".join(p.text for p in pieces) == whole.text
        assert pieces[-1].finish_reason == whole.finish_reason == "stop"
        assert pieces[-1].usage.completion_tokens == whole.usage.completion_tokens > 0


@pytest.mark.parametrize("schema, feature", [
    ({"type": "string", "format": "credit-card"}, "credit-card"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=a)b"}}}, "look-around"),
    ({"type": "unicorn"}, "unicorn"),
    ({"type": "array", "uniqueItems": True}, "uniqueitems"),
])
def test_an_uncompilable_schema_fails_before_generating(gguf_bundle, schema, feature):
    with edgeq.load(gguf_bundle) as model:
        before = list(model.engine.tokens)
        with pytest.raises(edgeq.EdgeqError, match="cannot be compiled|not usable") as err:
            model.chat([{"role": "user", "content": "hi"}], response_format=_format(schema))
        assert feature in str(err.value).lower()
        assert "\n" not in str(err.value)
        assert model.engine.tokens == before  # nothing was fed to the engine


@pytest.mark.parametrize("response_format", [
    "json", {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x"}},
    {"type": "regex"}, {"type": "regex", "pattern": ""}, {"type": "grammar", "grammar": "start: x", "syntax": "ebnf"},
    {"type": "json_schema", "json_schema": {"schema": [1, 2]}},
])
def test_malformed_response_formats_are_one_line(response_format):
    with pytest.raises(edgeq.EdgeqError) as err:
        response_format_grammar(response_format)
    assert "\n" not in str(err.value)


def test_text_response_format_is_free_text():
    assert response_format_grammar({"type": "text"}) is None and response_format_grammar(None) is None


def test_bad_generation_arguments_are_refused(gguf_bundle):
    with edgeq.load(gguf_bundle) as model:
        hi = [{"role": "user", "content": "hi"}]
        with pytest.raises(edgeq.EdgeqError, match="beyond the context"):
            model.chat(hi, max_new_tokens=model.engine.n_ctx)
        with pytest.raises(edgeq.EdgeqError, match="context holds"):
            model.generate("fox " * 400, max_new_tokens=8)
        assert model.generate("fox " * 400, max_new_tokens=8, truncate=True, temperature=0.0) is not None
        with pytest.raises(edgeq.EdgeqError, match="empty"):
            model.chat(hi, stop=["ok", ""])
        with pytest.raises(edgeq.EdgeqError, match="temperature"):
            model.chat(hi, temperature=-0.5)


# Schemas a small app would send, with free-form strings: the real model has to close them itself.
APP_SCHEMAS = [
    {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
                                      "genres": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3}},
     "required": ["title", "year", "genres"], "additionalProperties": False},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                                      "reason": {"type": "string", "maxLength": 200}}, "required": ["sentiment", "confidence", "reason"]},
    {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string", "format": "email"},
                                      "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                                  "required": ["city", "zip"]}}, "required": ["name", "email", "address"]},
]
APP_PROMPTS = ["Describe a famous movie as JSON.", "Classify the sentiment of: 'The battery died after an hour.'",
               "Make up a customer record as JSON."]


@pytest.mark.integration
def test_the_default_model_fills_app_schemas(tmp_path):
    """On llama.cpp; the masks are the same on every engine (the tiny-model tests above cover each one)."""
    from edgeq.default_model import default_model_path

    bundle = edgeq.export(default_model_path(progress=False), format="gguf", precision="Q8_0", output=tmp_path / "q8", eval_tokens=0)
    with edgeq.load(bundle) as model:
        for schema, prompt in zip(APP_SCHEMAS, APP_PROMPTS):
            reply = model.chat([{"role": "user", "content": prompt}], response_format=_format(schema), max_new_tokens=200)
            assert reply.finish_reason == "stop", reply.text
            jsonschema.validate(json.loads(reply.text), schema, format_checker=jsonschema.FormatChecker())
