"""Tool calls: rendered through the template, generated under the function's schema, parsed per format."""
from __future__ import annotations

import json

import jsonschema
import pytest

import edgeq
from edgeq.tools import TOOL_FORMATS, tool_format

from conftest import build_model, build_tokenizer
from tool_templates import HERMES, LLAMA3_JSON, build_tool_model

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99}, "b": {"type": "integer", "minimum": -99, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _with_tool_tokens(template):
    """The tiny tokenizer plus <tool_call> and </tool_call> as added tokens, as Qwen's vocabulary has them."""
    def tokenizer(folder):
        build_tokenizer(folder)
        data = json.loads((folder / "tokenizer.json").read_text())
        top = max([*data["model"]["vocab"].values(), *(t["id"] for t in data["added_tokens"])])
        for i, text in enumerate(("<tool_call>", "</tool_call>"), start=top + 1):
            data["added_tokens"].append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                                         "normalized": False, "special": False})
        (folder / "tokenizer.json").write_text(json.dumps(data))
        (folder / "chat_template.jinja").write_text(template)
    return tokenizer


@pytest.fixture(scope="module")
def hermes_model(tmp_path_factory):
    return build_tool_model(tmp_path_factory.mktemp("tools") / "tiny-hermes")


@pytest.fixture(scope="module")
def hermes_gguf(tmp_path_factory, hermes_model):
    return edgeq.export(hermes_model, format="gguf", precision="F16", output=tmp_path_factory.mktemp("tools") / "hermes-gguf", eval_tokens=0)


def _assert_valid(calls, tools=TOOLS):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.name in schemas
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_required_calls_parse_and_validate(hermes_gguf):
    with edgeq.load(hermes_gguf, threads=1) as model:
        for seed in range(4):
            reply = model.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed)
            assert reply.finish_reason == "tool_calls" and len(reply.tool_calls) == 1, reply
            _assert_valid(reply.tool_calls)
        # parallel calls: a random model keeps calling until max_new_tokens; every complete call counts and is valid
        reply = model.chat(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=9, max_new_tokens=100)
        _assert_valid(reply.tool_calls)


def test_a_named_choice_calls_that_function(hermes_gguf):
    with edgeq.load(hermes_gguf, threads=1) as model:
        reply = model.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}}, temperature=1.0, seed=5)
        assert [c.name for c in reply.tool_calls] == ["add"]
        _assert_valid(reply.tool_calls)


def test_auto_calls_are_valid_whenever_the_model_makes_them(hermes_gguf):
    with edgeq.load(hermes_gguf, threads=1) as model:
        for seed in range(3):
            reply = model.chat(ASK, tools=TOOLS, temperature=1.0, seed=seed, max_new_tokens=120)
            if reply.tool_calls:
                _assert_valid(reply.tool_calls)
                assert "<tool_call>" not in reply.text
            else:
                assert reply.finish_reason in ("stop", "length")


def test_streamed_tool_calls_equal_the_whole_reply(hermes_gguf):
    with edgeq.load(hermes_gguf, threads=1) as model:
        options = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=0.0)
        whole = model.chat(ASK, **options)
        chunks = list(model.chat(ASK, stream=True, **options))
        assert "".join(c.text for c in chunks) == whole.text == ""
        last = chunks[-1]
        assert last.finish_reason == "tool_calls"
        assert [(c.name, c.arguments) for c in last.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]


def test_tool_results_go_back_through_the_template(hermes_gguf):
    with edgeq.load(hermes_gguf, threads=1) as model:
        first = model.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
        call = first.tool_calls[0]
        history = ASK + [first.message(), {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
        prompt = model.tokenizer.render_chat(edgeq.tools.history_for_template(history), tools=TOOLS)
        assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt
        assert f'"name": "{call.name}", "arguments": {json.dumps(json.loads(call.arguments), ensure_ascii=False)}' in prompt
        second = model.chat(history, tools=TOOLS, max_new_tokens=20)
        assert second.usage.prompt_tokens > first.usage.prompt_tokens
        assert second.usage.cached_tokens > 0  # the first turn's prompt was still in the cache


def test_special_tool_tokens(tmp_path):
    folder = build_model(tmp_path / "tiny-qwen-tokens", "Qwen2ForCausalLM", tokenizer=_with_tool_tokens(HERMES), max_position_embeddings=2048)
    with edgeq.load(folder) as model:
        assert model._is_special("<tool_call>")
        reply = model.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=1)
        assert reply.finish_reason == "tool_calls"
        _assert_valid(reply.tool_calls)


def test_llama3_json_calls(tmp_path):
    folder = build_tool_model(tmp_path / "tiny-llama3-tools", LLAMA3_JSON, "LlamaForCausalLM")
    with edgeq.load(folder) as model:
        assert tool_format(model.tokenizer.chat_template, model.name).name == "llama3"
        reply = model.chat(ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=0)
        assert reply.finish_reason == "tool_calls" and len(reply.tool_calls) == 1
        _assert_valid(reply.tool_calls)
        history = ASK + [reply.message(), {"role": "tool", "content": "42"}]
        assert "<|im_start|>ipython\n42" in model.tokenizer.render_chat(edgeq.tools.history_for_template(history), tools=TOOLS)


def test_a_template_without_tools_is_refused_by_name(tiny_llama):
    with edgeq.load(tiny_llama) as model:
        with pytest.raises(edgeq.EdgeqError, match="tiny-llama: its chat template has no tool support") as err:
            model.chat(ASK, tools=TOOLS)
        assert "\n" not in str(err.value)
        assert model.chat(ASK, tools=TOOLS, tool_choice="none", max_new_tokens=4).tool_calls == []


@pytest.mark.parametrize("tools, choice, message", [
    ([], "auto", "non-empty list"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "auto", "letters, digits"),
    ([WEATHER, WEATHER], "auto", "used twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "auto", "JSON schema object"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    (TOOLS, "sometimes", "tool_choice must be"),
])
def test_bad_tool_arguments(hermes_model, tools, choice, message):
    with edgeq.load(hermes_model) as model:
        with pytest.raises(edgeq.EdgeqError, match=message):
            model.chat(ASK, tools=tools, tool_choice=choice)


def test_parsers():
    hermes, llama3 = TOOL_FORMATS
    content, calls = hermes.parse('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
                                  '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>')
    assert content == "Let me check.\n" and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1}), ("g", {})]
    assert hermes.parse('<tool_call>\n{"name": "f", "argu')[1] == []  # cut off by max_tokens: not a call
    assert hermes.call_start("Sure <tool_") == 5 and hermes.call_start("plain text") is None
    content, calls = llama3.parse('<|python_tag|>{"name": "f", "parameters": {"q": "a"}}; {"name": "g", "parameters": {}}')
    assert content == "" and [c.name for c in calls] == ["f", "g"] and json.loads(calls[0].arguments) == {"q": "a"}
    assert llama3.parse("The answer is 4.") == ("The answer is 4.", [])
    assert llama3.call_start("  ") == 0 and llama3.call_start("Hi") is None
    content, calls = hermes.parse('{"name": "f", "arguments": {"x": 2}}')  # Qwen2.5-Coder's bare call
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 2})]
    assert hermes.parse('{"not": "a call"}') == ('{"not": "a call"}', []) and hermes.call_start("{") == 0
