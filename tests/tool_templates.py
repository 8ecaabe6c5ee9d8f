"""Chat templates with tool support, written for the tests in the two call formats edgeq parses.

HERMES renders tools and calls the way Qwen2.5/Qwen3 do (tools in <tools></tools> in the system turn,
calls in <tool_call></tool_call>, results in <tool_response></tool_response>); LLAMA3_JSON the way
Llama 3.1's JSON tool calling does (a call is the reply's JSON {"name", "parameters"}, results come back
in an "ipython" turn). Both use the tiny tokenizer's ChatML tokens. WEATHER and SCHEMA are a tool and a
response schema the app tests (serve, executorch's apps) ask of a tiny model.
"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "score"], "additionalProperties": False}

HERMES = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions to assist with the user query.
The function signatures are within <tools></tools> XML tags:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each call, write a JSON object with the function name and arguments within <tool_call></tool_call> XML tags.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content }}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role != 'system' %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA3_JSON = """{%- for message in messages %}
{%- if message.role == 'user' and loop.last and tools %}<|im_start|>user
Given the following functions, respond with a JSON for a function call with its proper arguments.
Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}{"name": "{{ call.function.name }}", "parameters": {{ call.function.arguments | tojson }}}{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>ipython
{{ message.content }}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def build_tool_model(folder, template: str = HERMES, architecture: str = "Qwen2ForCausalLM"):
    """A tiny random model whose chat template speaks a tool format (context 2048: the toy tokenizer spends
    ~750 tokens on two tool descriptions)."""
    from conftest import build_model, build_tokenizer

    def tokenizer(target):
        build_tokenizer(target)
        (target / "chat_template.jinja").write_text(template)

    return build_model(folder, architecture, tokenizer=tokenizer, max_position_embeddings=2048)
