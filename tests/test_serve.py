"""`edgeq serve`, driven by the official `openai` client and by raw HTTP on a free local port."""
from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import jsonschema
import pytest

import edgeq

from tool_templates import SCHEMA, WEATHER, build_tool_model

openai = pytest.importorskip("openai")

HI = [{"role": "user", "content": "Hello fox"}]
LONG = {"type": "regex", "pattern": "[a-z]{1500}"}  # forces a long generation (a random model could stop early)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("serve")
    hermes = edgeq.export(build_tool_model(root / "src"), format="gguf", precision="F16", output=root / "hermes", eval_tokens=0)
    plain = edgeq.export(tiny_llama, format="gguf", precision="F16", output=root / "plain", eval_tokens=0)
    return hermes, plain


@pytest.fixture(scope="module")
def server(bundles):
    models = [edgeq.load(b, threads=1) for b in bundles]
    with edgeq.serve(models, port=0, block=False, log_level="warning") as running:
        yield running
    for model in models:
        model.close()


def _client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=120, **kw)


def _raw(server, method, path, body=None, headers=None):
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, text = response.status, response.read().decode()
    conn.close()
    return status, text


def test_models_health_and_binding(server):
    assert server.url.startswith("http://127.0.0.1:")
    assert sorted(m.id for m in _client(server).models.list()) == ["hermes", "plain"]
    status, text = _raw(server, "GET", "/health")
    assert status == 200 and json.loads(text)["status"] == "ok"


def test_plain_streaming_and_completions(server):
    client = _client(server)
    whole = client.chat.completions.create(model="plain", messages=HI, max_tokens=16, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length") and whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = client.chat.completions.create(model="plain", messages=HI, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [choice.finish_reason]
    text = client.completions.create(model="plain", prompt="Hello fox", max_tokens=8, temperature=0, seed=1).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="plain", prompt="Hello fox", max_tokens=8,
                                                                             temperature=0, stream=True) if c.choices)
    assert streamed == text


def test_tools_through_the_client(server):
    client = _client(server)
    for stream in (False, True):
        reply = client.chat.completions.create(model="hermes", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                               tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                                               temperature=0.8, seed=3, stream=stream)
        if stream:
            chunks = list(reply)
            calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            calls, finish = reply.choices[0].message.tool_calls, [reply.choices[0].finish_reason]
        assert finish == ["tool_calls"] and len(calls) == 1
        assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
        jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
    # the call and its result go back for the next turn
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": calls[0].id, "type": "function",
                                                                      "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}]},
               {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}]
    follow = client.chat.completions.create(model="hermes", messages=history, tools=[WEATHER], max_tokens=8, temperature=0)
    assert follow.usage.prompt_tokens > 0


def test_response_format_through_the_client(server):
    client = _client(server)
    reply = client.chat.completions.create(model="plain", messages=HI, temperature=1.0, seed=2, max_tokens=60,
                                           response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


def test_concurrent_clients_get_what_they_would_alone(server):
    client = _client(server)

    def ask(i, j):
        return client.chat.completions.create(model="plain", messages=[{"role": "user", "content": f"Tell me about {i} and {j}"}],
                                              max_tokens=10, temperature=0).choices[0].message.content

    alone = {(i, j): ask(i, j) for i in range(8) for j in range(4)}

    def one_client(i):
        own = _client(server)
        return [(i, j, own.chat.completions.create(model="plain", messages=[{"role": "user", "content": f"Tell me about {i} and {j}"}],
                                                    max_tokens=10, temperature=0).choices[0].message.content) for j in range(4)]

    with ThreadPoolExecutor(8) as pool:
        together = [r for rs in pool.map(one_client, range(8)) for r in rs]
    assert len(together) == 32
    assert {(i, j): text for i, j, text in together} == alone


MALFORMED = [
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", [1, 2], 400),
    ("POST", "/v1/chat/completions", {"messages": HI}, 400),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": HI}, 404),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "max_tokens": -5}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "max_tokens": "ten"}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "max_tokens": 100000}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "temperature": "hot"}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "temperature": -1}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "top_p": 0}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": "hello"}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": []}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": [{"role": "user"}]}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "stop": [""]}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "stop": 5}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": [{"role": "user", "content": "fox " * 3000}]}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "unicorn"}}}}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "response_format": {"type": "regex", "pattern": "("}}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "response_format": {"type": "yaml"}}, 400),
    ("POST", "/v1/chat/completions", {"model": "hermes", "messages": HI, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "tools": [WEATHER]}, 400),  # its template has no tools
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "n": 3}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "stream": "yes"}, 400),
    ("POST", "/v1/chat/completions", {"model": "plain", "messages": HI, "frobnicate": 1}, 400),
    ("POST", "/v1/completions", {"model": "plain", "prompt": 123}, 400),
    ("GET", "/v1/chat/completions", None, 405),
    ("POST", "/v1/nothing", {}, 404),
]


def test_malformed_requests_get_openai_errors_and_the_server_lives(server):
    for method, path, body, status in MALFORMED:
        got, text = _raw(server, method, path, body)
        assert got == status, (body, got, text)
        error = json.loads(text)["error"]
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"], (body, error)
    got, _ = _raw(server, "POST", "/v1/chat/completions", b"{}", {"Content-Length": str(1 << 30)})
    assert got == 413
    assert _raw(server, "GET", "/health")[0] == 200
    assert _client(server).chat.completions.create(model="plain", messages=HI, max_tokens=2).choices


def test_key_queue_disconnect_and_timeout(bundles):
    hermes, _ = bundles
    with edgeq.load(hermes, threads=1) as model, edgeq.serve([model], port=0, block=False, queue_size=0, api_key="sekret",
                                                             log_level="warning") as server:
        with pytest.raises(openai.AuthenticationError):
            _client(server).models.list()
        assert _raw(server, "GET", "/health")[0] == 200  # health needs no key
        client = _client(server, api_key="sekret")
        stream = client.chat.completions.create(model="hermes", messages=HI, max_tokens=1500, stream=True, response_format=LONG)
        next(iter(stream))  # the long request runs now
        with pytest.raises(openai.RateLimitError):  # and nothing may wait beside it
            client.chat.completions.create(model="hermes", messages=HI, max_tokens=2)
        stream.close()  # the client leaves
        slot = server.service.slots["hermes"]
        deadline = time.monotonic() + 20
        while slot.held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slot.held == 0 and model.stats.generated_tokens < 1000  # generation stopped with the client
        assert client.chat.completions.create(model="hermes", messages=HI, max_tokens=2).choices
    with edgeq.load(hermes, threads=1) as model, edgeq.serve([model], port=0, block=False, timeout=0.05, log_level="warning") as server:
        # ~700 constrained tokens: 0.5 s on this machine when quiet, so the deadline passes while chunks still come fast
        status, text = _raw(server, "POST", "/v1/chat/completions", {"model": "hermes", "messages": HI, "max_tokens": 1500,
                                                                     "response_format": LONG})
        assert status == 504 and json.loads(text)["error"]["code"] == "timeout"


def test_serve_command_help():
    from click.testing import CliRunner

    from edgeq.cli import main

    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0 and "--api-key" in result.output and "127.0.0.1" in result.output


def test_speculation_through_the_client(tmp_path, tiny_llama):
    """A model served drafting for itself: `"speculative": false` (extra_body), speculation and
    a Predicted Output give the same greedy text; usage reports the prediction tokens, in whole and streamed replies."""
    q8 = edgeq.export(tiny_llama, format="gguf", precision="Q8_0", output=tmp_path / "q8", eval_tokens=0)
    with edgeq.serve([q8], port=0, block=False, log_level="warning", threads=1, drafts={"q8": str(q8)}, draft_tokens=6) as server:
        client = _client(server)
        off = client.chat.completions.create(model="q8", messages=HI, max_tokens=32, temperature=0, extra_body={"speculative": False})
        text = off.choices[0].message.content
        assert off.usage.completion_tokens_details.accepted_prediction_tokens == 0
        # a draft as large as its target never pays, and the depth policy knows it from the costs timed at load: drafted
        # as deep as allowed here, so the usage reported has passes in it
        server.service.slot("q8").model.speculation.fixed_depth = True
        drafted = client.chat.completions.create(model="q8", messages=HI, max_tokens=32, temperature=0)
        assert drafted.choices[0].message.content == text
        details = drafted.usage.completion_tokens_details
        assert details.accepted_prediction_tokens > 0 and details.model_extra["speculative_passes"] > 0
        stream = client.chat.completions.create(model="q8", messages=HI, max_tokens=32, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, prediction={"type": "content", "content": text})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        # prompt lookup over the prediction; the depth adapts to what passes cost here, so how much it drafted is the machine's call
        assert {"speculative_passes", "accepted_prediction_tokens"} <= set(chunks[-1].usage.completion_tokens_details.model_dump())
        status, body = _raw(server, "POST", "/v1/chat/completions", {"model": "q8", "messages": HI, "speculative": "no"})
        assert status == 400 and "speculative" in json.loads(body)["error"]["message"]
    with pytest.raises(edgeq.EdgeqError, match="not a served bundle"):
        edgeq.serve([q8], port=0, block=False, drafts={"nope": "lookup"})
