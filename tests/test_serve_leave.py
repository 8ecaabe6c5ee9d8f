"""A client that leaves frees its model at once, whether it streamed or waited for the whole reply; one beyond the queue
is told when to come back."""
from __future__ import annotations

import http.client
import json
import time

import pytest

import edgeq

from tool_templates import build_tool_model

# Tokens decoded after the client left (a token of this model takes ~1 ms, less than a busy machine's scheduling delay):
# a whole reply was decoded on (664 tokens) before the client was watched; a stream stopped after ~15 either way, and
# how promptly it stops against a real decode step is bench/serve_load.py's bar, so here it only has to stop. A whole
# reply may also run on for what the server takes to notice the closed socket (`NOTICE_S` at the measured rate): a
# bound of 8 alone failed one full-suite run of five with 16.
MORE_TOKENS = {False: 8, True: 100}
NOTICE_S = 0.05
LONG = {"type": "regex", "pattern": "[a-z]{1500}"}  # forces a long generation (a random model could stop early)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny model with a context of 2048 tokens, so a generation lasts long enough to leave in the middle of."""
    root = tmp_path_factory.mktemp("leave")
    return edgeq.export(build_tool_model(root / "model"), format="gguf", precision="Q8_0", output=root / "long", eval_tokens=0)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_the_model(bundle, stream):
    pytest.importorskip("fastapi")
    with edgeq.load(bundle, threads=1) as model, edgeq.serve([model], port=0, block=False, log_level="warning") as server:
        port = int(server.url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {"model": bundle.name, "messages": [{"role": "user", "content": "Hello fox"}], "max_tokens": 1500,
                "response_format": LONG, "stream": stream}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        slot = server.service.slots[bundle.name]
        deadline = time.monotonic() + 10
        while not model.stats.generated_tokens and time.monotonic() < deadline:
            time.sleep(0.001)
        first = (time.monotonic(), model.stats.generated_tokens)
        while model.stats.generated_tokens < 50 and time.monotonic() < deadline:  # generating for a while
            time.sleep(0.005)
        conn.sock.close()  # the client leaves without reading
        left, at_leave = time.monotonic(), model.stats.generated_tokens
        rate = (at_leave - first[1]) / max(left - first[0], 1e-3)
        while slot.held and time.monotonic() - left < 10:
            time.sleep(0.001)
        after = model.stats.generated_tokens - at_leave
        assert slot.held == 0 and after <= max(MORE_TOKENS[stream], rate * NOTICE_S), (after, rate)


def test_beyond_the_queue_a_429_says_when_to_come_back(bundle):
    pytest.importorskip("fastapi")
    with edgeq.load(bundle, threads=1) as model, edgeq.serve([model], port=0, block=False, queue_size=0, log_level="warning") as server:
        port = int(server.url.rsplit(":", 1)[1])
        body = {"model": bundle.name, "messages": [{"role": "user", "content": "Hello fox"}], "max_tokens": 1500,
                "response_format": LONG, "stream": True}
        busy = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        busy.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        busy.getresponse().readline()  # it runs now, and nothing may wait beside it
        extra = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        extra.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": False}), {"Content-Type": "application/json"})
        answer = extra.getresponse()
        assert answer.status == 429 and int(answer.getheader("Retry-After")) >= 1
        busy.sock.close()
