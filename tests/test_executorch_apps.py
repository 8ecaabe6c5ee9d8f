"""An executorch bundle behind every app edgeq has, unchanged: `edgeq run` and the Python API (the same greedy reply),
JSON-schema constraints, tool calls, `edgeq serve` through the official OpenAI client over real HTTP, `edgeq eval` and
`edgeq profile`. A tiny random Qwen2 whose template speaks Hermes tool calls, at the default 8da4w, one thread."""
from __future__ import annotations

import json

import jsonschema
import pytest
from click.testing import CliRunner

import edgeq
from edgeq.cli import main

from tool_templates import SCHEMA, WEATHER, build_tool_model

ASK = [{"role": "user", "content": "Weather in Paris?"}]
VERDICT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("executorch-apps")
    return edgeq.export(build_tool_model(root / "hermes"), format="executorch", rounding="nearest", output=root / "hermes-pte",
                        eval_tokens=0, progress=False)


@pytest.fixture(scope="module")
def model(bundle):
    with edgeq.load(bundle, threads=1) as loaded:
        yield loaded


def test_run_and_the_python_api_give_the_same_greedy_reply(bundle, model):
    shown = CliRunner().invoke(main, ["run", str(bundle), ASK[0]["content"], "--max-new-tokens", "24", "--threads", "1"])
    assert shown.exit_code == 0, shown.output
    reply = model.generate(messages=ASK, max_new_tokens=24)
    assert reply.strip() and shown.stdout == reply + "\n"
    ids = model.generate_ids(model.tokenizer.encode_chat(ASK), 24)
    assert model.tokenizer.decode([i for i in ids if i not in model.tokenizer.spec.stop_token_ids]) == reply


def test_a_json_schema_reply_and_a_tool_call_are_valid(model):
    reply = model.chat(ASK, response_format=VERDICT, temperature=1.0, seed=2, max_new_tokens=60)
    assert reply.finish_reason == "stop"
    jsonschema.validate(json.loads(reply.text), SCHEMA)
    called = model.chat(ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, temperature=0.8, seed=3)
    assert len(called.tool_calls) == 1 and called.tool_calls[0].name == "get_weather"
    jsonschema.validate(json.loads(called.tool_calls[0].arguments), WEATHER["function"]["parameters"])


def test_serve_answers_a_json_schema_request_with_valid_json(model):
    openai = pytest.importorskip("openai")
    with edgeq.serve([model], port=0, block=False, log_level="warning") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=model.name, messages=ASK, temperature=1.0, seed=2, max_tokens=60,
                                               response_format=VERDICT)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
        called = client.chat.completions.create(model=model.name, messages=ASK, tools=[WEATHER], tool_choice="required",
                                                parallel_tool_calls=False, temperature=0.8, seed=3)
        jsonschema.validate(json.loads(called.choices[0].message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_eval_and_profile_measure_it(bundle, tmp_path):
    runner = CliRunner()
    shown = runner.invoke(main, ["eval", str(bundle), "--tokens", "128", "--ctx", "64", "--threads", "1", "--json"])
    assert shown.exit_code == 0, shown.output
    quality = json.loads(shown.stdout)
    # against the torch reference; a random tiny model at 4 bits measures ~0.3 (test_executorch), a broken engine several nats
    assert quality["tokens"] > 0 and 0 < quality["kl"] < 0.6, quality
    out = tmp_path / "profile.json"
    shown = runner.invoke(main, ["profile", str(bundle), "--prompt-tokens", "16", "--gen", "8", "--repeat", "1", "--threads", "1",
                                 "--json", str(out)])
    assert shown.exit_code == 0, shown.output
    measured = json.loads(out.read_text())
    row = measured["bundles"][0]
    assert row["runtime"] == "executorch" and row["prompts"][0]["decode_tokens_per_s"]["median"] > 0
