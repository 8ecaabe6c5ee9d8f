"""Tool calls: OpenAI-style function specs rendered through the model's own chat template, the reply
parsed back into structured calls, and each call's arguments constrained by its function's schema.

Models are fine-tuned to one tool-call format, and their chat templates both describe the tools and
render past calls in it, so the format is read off the template (`TOOL_FORMATS`, first match wins):
- hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call
  (Qwen2.5, Qwen3, SmolLM3, Hermes 2/3), or the call's bare JSON as the whole reply (Qwen2.5-Coder);
- llama3: the whole reply is `{"name": ..., "parameters": {...}}` (Llama 3.1-3.3 JSON tool calling),
  possibly after `<|python_tag|>`.
A template that never reads `tools` (SmolLM2, TinyLlama, Llama 2, Gemma 3) is refused by name: the
model was not trained to call tools, and a grammar would only force it out of its distribution.

While a call is generated, an llguidance grammar (`constrain.py`) lets the model write free text or
open a call; once the call opens, the function name must be one of the tools and the arguments must
fit that function's JSON schema, so every call parses and validates.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .errors import EdgeqError

CHOICES = ("auto", "required", "none")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI's API returns it

    def to_dict(self) -> dict:
        """The OpenAI `tool_calls` entry (also what goes back into the history for the next turn)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(name: str, arguments: Any) -> ToolCall:
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, json.dumps(arguments, ensure_ascii=False))


# ---- what the caller passes --------------------------------------------------------------------------

def check_tools(tools: Any) -> list[dict]:
    """OpenAI-style `[{"type": "function", "function": {"name", "description", "parameters"}}]`, normalized."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise EdgeqError('tools must be a non-empty list of {"type": "function", "function": {"name": ..., "parameters": {...}}}')
    out, names = [], set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", function["name"]):
            raise EdgeqError(f'tools[{i}] must be {{"type": "function", "function": {{"name": "a_name", "parameters": {{...}}}}}} '
                             "with a name of letters, digits, _ . - (at most 64)")
        if function["name"] in names:
            raise EdgeqError(f"tools[{i}]: the function name {function['name']!r} is used twice; names must be unique")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise EdgeqError(f"tools[{i}].function.parameters must be a JSON schema object, got {type(parameters).__name__}")
        names.add(function["name"])
        out.append({"type": "function", "function": {**function, "parameters": parameters}})
    return out


def check_choice(tool_choice: Any, tools: list[dict]) -> str | None:
    """"auto" | "required" | "none", or the one function name a `{"type": "function", ...}` choice forces."""
    if tool_choice is None or tool_choice in CHOICES:
        return tool_choice or "auto"
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise EdgeqError('tool_choice must be "auto", "required", "none" or {"type": "function", "function": {"name": ...}}, '
                         f"got {tool_choice!r}")
    known = [t["function"]["name"] for t in tools]
    if name not in known:
        raise EdgeqError(f"tool_choice names {name!r}, which is not among the tools ({', '.join(known)})")
    return name


def history_for_template(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: an assistant turn that only called tools has content ""
    (templates concatenate it), and call arguments are objects (templates apply `tojson` to them)."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            out.append(message)  # the message check names what is wrong with it
            continue
        message = dict(message)
        if message.get("content") is None and (message.get("tool_calls") or message.get("role") == "assistant"):
            message["content"] = ""
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_call_for_template(c) for c in message["tool_calls"]]
        out.append(message)
    return out


def _call_for_template(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    function = dict(call["function"])
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            raise EdgeqError(f"a tool call's arguments in the history are not JSON: {function['arguments'][:80]!r}") from None
    return {**call, "function": function}


# ---- formats -----------------------------------------------------------------------------------------

def _function_schema(tool: dict, arguments_key: str) -> dict:
    function = tool["function"]
    return {"type": "object", "properties": {"name": {"const": function["name"]}, arguments_key: function["parameters"]},
            "required": ["name", arguments_key], "additionalProperties": False}


def _calls_schema(tools: list[dict], choice: str, arguments_key: str) -> str:
    from .constrain import JSON_STYLE

    chosen = [t for t in tools if choice in ("auto", "required") or t["function"]["name"] == choice]
    schemas = [_function_schema(t, arguments_key) for t in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return json.dumps({**schema, "x-guidance": JSON_STYLE})


def _literal(text: str) -> str:
    return json.dumps(text)


@dataclass(frozen=True)
class ToolFormat:
    name: str
    models: str
    detect: Callable[[str], bool]
    grammar: Callable[[list[dict], str, Callable[[str], bool], bool], str]  # tools, choice, is-special, parallel calls
    call_start: Callable[[str], int | None]
    parse: Callable[[str], tuple[str, list[ToolCall]]]


# hermes: <tool_call>\n{json}\n</tool_call>, repeated -----------------------------------------------------

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _hermes_grammar(tools: list[dict], choice: str, special: Callable[[str], bool], parallel: bool) -> str:
    # In "auto", a reply that opens with "{" is a bare call (Qwen2.5-Coder writes them without the tags), so it
    # is held to the schema too; any other reply is free text, with tagged calls anywhere in it.
    rules = (f"body: %json {_calls_schema(tools, choice, 'arguments')}\nTEXT: /(.|\\n)+/\n"
             "FIRST: /[^{](.|\\n)*/\n")
    if special(OPEN) and special(CLOSE):  # one token each (Qwen): free text cannot spell them, the model picks them
        rules += f'call: {OPEN} "\\n" body "\\n" {CLOSE}\n'
        auto = "start: body | FIRST? (call TEXT?)*\n" if parallel else "start: body | FIRST | FIRST? call\n"
    else:
        rules += f"call: {_literal(OPEN + chr(10))} body {_literal(chr(10) + CLOSE)}\n"
        # free text runs until it ends in the opening tag (a lazy lexeme), then the rest of a call must follow
        rules += (f"first[lazy]: FIRST_ANY {_literal(OPEN)}\nlead[lazy]: TEXT_ANY {_literal(OPEN)}\n"
                  f"opened: {_literal(chr(10))} body {_literal(chr(10) + CLOSE)}\n"
                  "TEXT_ANY: /(.|\\n)*/\nFIRST_ANY: /([^{](.|\\n)*)?/\n")
        auto = ("start: body | FIRST? | first opened (lead opened)* TEXT?\n" if parallel
                else "start: body | FIRST | first opened\n")
    required = 'start: call ("\\n" call)*\n' if parallel else "start: call\n"
    start = {"auto": auto, "required": required}.get(choice, "start: call\n")
    return f"%llguidance {{}}\n{start}{rules}"


def _hermes_call_start(text: str) -> int | None:
    if text[:1] == "{":
        return 0  # a bare call
    found = text.find(OPEN)
    if found >= 0:
        return found
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):  # the tag may still be arriving
        if OPEN.startswith(text[-n:]):
            return len(text) - n
    return None


def _hermes_parse(text: str) -> tuple[str, list[ToolCall]]:
    start = text.find(OPEN)
    if start < 0:
        return _bare_call(text)
    calls = []
    for block in re.findall(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), text[start:], flags=re.DOTALL):
        try:
            data = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("name"), str) and isinstance(data.get("arguments", {}), dict):
            calls.append(_call(data["name"], data.get("arguments", {})))
    return text[:start], calls


def _bare_call(text: str) -> tuple[str, list[ToolCall]]:
    """A reply that is one call's JSON and nothing else, as Qwen2.5-Coder writes calls without their tags."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text, []
    if isinstance(data, dict) and isinstance(data.get("name"), str) and isinstance(data.get("arguments"), dict):
        return "", [_call(data["name"], data["arguments"])]
    return text, []


# llama3: the reply is {"name": ..., "parameters": {...}} ----------------------------------------------------

PYTHON_TAG = "<|python_tag|>"


def _llama3_grammar(tools: list[dict], choice: str, special: Callable[[str], bool], parallel: bool) -> str:
    # one call per reply: the format has no separator between calls that Llama 3 was trained on
    tag = f"<{PYTHON_TAG[1:-1]}>? " if special(PYTHON_TAG) else ""
    rules = f"call: {tag}body\nbody: %json {_calls_schema(tools, choice, 'parameters')}\n"
    if choice == "auto":  # a reply that opens with "{" is a call; anything else is text
        return f"%llguidance {{}}\nstart: TEXT | call\nTEXT: /[^{{](.|\\n)*/\n{rules}"
    return f"%llguidance {{}}\nstart: call\n{rules}"


def _llama3_call_start(text: str) -> int | None:
    stripped = text.lstrip()
    if not stripped or stripped.startswith(("{", PYTHON_TAG)) or PYTHON_TAG.startswith(stripped):
        return 0  # undecided or a call: nothing is content yet
    return None


def _llama3_parse(text: str) -> tuple[str, list[ToolCall]]:
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    if not body.startswith("{"):
        return text, []
    calls = []
    decoder = json.JSONDecoder()
    position = 0
    while position < len(body):
        try:
            data, end = decoder.raw_decode(body, position)
        except json.JSONDecodeError:
            break
        if isinstance(data, dict) and isinstance(data.get("name"), str):
            arguments = data.get("parameters", data.get("arguments", {}))
            if isinstance(arguments, dict):
                calls.append(_call(data["name"], arguments))
        position = end
        while position < len(body) and body[position] in " ;\n\t":
            position += 1
    return ("", calls) if calls else (text, [])


TOOL_FORMATS = (
    ToolFormat("hermes", "Qwen2.5, Qwen3, SmolLM3, Hermes", lambda t: OPEN in t, _hermes_grammar, _hermes_call_start, _hermes_parse),
    ToolFormat("llama3", "Llama 3.1-3.3", lambda t: PYTHON_TAG in t or ("ipython" in t and '"parameters"' in t),
               _llama3_grammar, _llama3_call_start, _llama3_parse),
)


def reads_tools(template: str) -> bool:
    """Whether the template uses the `tools` variable at all (parsed, not searched: a comment does not count)."""
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        return "tools" in meta.find_undeclared_variables(Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template))
    except TemplateSyntaxError:
        return False


def tool_format(template: str | None, model_name: str) -> ToolFormat:
    """The tool-call format this model's template speaks, or one line saying it has none."""
    supported = "; ".join(f"{f.name} ({f.models})" for f in TOOL_FORMATS)
    if not template or not reads_tools(template):
        raise EdgeqError(f"{model_name}: its chat template has no tool support (it never reads `tools`), so the model "
                         f"was not trained to call tools; use a model whose template does ({supported}), or describe "
                         "the tools in a message and ask for JSON with response_format")
    for candidate in TOOL_FORMATS:
        if candidate.detect(template):
            return candidate
    raise EdgeqError(f"{model_name}: its chat template renders tools in a call format edgeq does not parse; known: {supported}")
