"""Greedy replies of `edgeq serve` do not depend on the server's history (issue 32): on SmolLM2-135M Q4_K_M, 8 prompts
sent to a fresh process, each again right after itself (its prefix cached), by 8 concurrent clients, streamed, and with
speculation off, give the same text every time. The server drafts by prompt lookup, so verification is checked too."""
from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import edgeq
from edgeq.default_model import default_model_path

openai = pytest.importorskip("openai")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog.",
    "List three prime numbers and explain why they are prime.",
    "Fix the typo in this sentence and return it: 'The wether is nice todya, lets go for a walk in the park.'",
    "Explain what a neural network is in two sentences.",
    "def add(a, b):\n    return a + b\n\nRewrite this Python function with type hints.",
    "Give me a short recipe for pancakes.",
]


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory):
    bundle = edgeq.export(default_model_path(progress=False), format="gguf", precision="Q4_K_M",
                          output=tmp_path_factory.mktemp("history") / "smollm2-q4km", eval_tokens=0)
    process = subprocess.Popen([sys.executable, "-c", "from edgeq.cli import main; main()", "serve", str(bundle), "--port", "0",
                                "--threads", "1", "--draft", "lookup"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = process.stderr.readline()
            assert line or process.poll() is None, "the server died while starting"
        url = re.search(r"(http://\S+/v1)", line).group(1)
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300), bundle.name
    finally:
        process.terminate()
        process.wait(30)


def test_greedy_replies_do_not_depend_on_what_the_server_did_before(fresh_server):
    client, name = fresh_server

    def ask(prompt, **extra):
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}], max_tokens=48,
                                               temperature=0, **extra)
        return reply.choices[0].message.content

    def streamed(prompt):
        chunks = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}], max_tokens=48,
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    fresh = [ask(p) for p in PROMPTS]
    rounds = {"repeated": [], "again, prefix cached": []}
    for prompt in PROMPTS:
        rounds["repeated"].append(ask(prompt))
        rounds["again, prefix cached"].append(ask(prompt))
    with ThreadPoolExecutor(8) as pool:
        rounds["8 concurrent"] = list(pool.map(ask, PROMPTS))
    rounds["streamed"] = [streamed(p) for p in PROMPTS]
    rounds["speculation off"] = [ask(p, extra_body={"speculative": False}) for p in PROMPTS]
    assert len(set(fresh)) == len(PROMPTS)
    for label, texts in rounds.items():
        assert texts == fresh, label
