"""Multi-turn chat reuses the engine's KV cache: turn N prefills only its new tokens, and says the same."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import edgeq
from edgeq.cli import main
from edgeq.decoding import PREFILL_CHUNK

TURNS = ["Hello there, fox.", "Tell me about numbers.", "And words?", "Thanks, bye."]


class CountingEngine:
    """The real engine, with the number of tokens each forward call is given written down."""

    def __init__(self, engine):
        self._engine, self.fed = engine, []

    def forward(self, tokens):
        self.fed.append(len(tokens))
        return self._engine.forward(tokens)

    def forward_all(self, tokens):
        self.fed.append(len(tokens))
        return self._engine.forward_all(tokens)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _bundle(tmp_path_factory, tiny_llama, fmt):
    precision = {"gguf": "F32", "onnx": "fp32"}[fmt]
    return edgeq.export(tiny_llama, format=fmt, precision=precision, output=tmp_path_factory.mktemp("cache") / fmt, eval_tokens=0)


@pytest.fixture(scope="module", params=["gguf", "onnx", "torch"])
def model_path(request, tmp_path_factory, tiny_llama):
    if request.param == "torch":
        return tiny_llama
    if request.param == "onnx":
        pytest.importorskip("onnxruntime")
    return _bundle(tmp_path_factory, tiny_llama, request.param)


def _converse(model, turns=TURNS, **sampling):
    """Replies of a chat, the history growing with each; returns (replies, tokens fed by each prefill, usages)."""
    history, replies, prefills, usages = [], [], [], []
    for text in turns:
        history.append({"role": "user", "content": text})
        before = len(model.engine.fed)
        reply = model.chat(history, max_new_tokens=12, **sampling)
        decoded = reply.usage.completion_tokens - (reply.finish_reason == "length")  # each chosen token but a last one is fed
        prefills.append(sum(model.engine.fed[before:len(model.engine.fed) - decoded]))
        history.append(reply.message())
        replies.append(reply.text)
        usages.append(reply.usage)
    return replies, prefills, usages


def test_a_sampled_turn_prefills_only_its_new_tokens(model_path):
    with edgeq.load(model_path, threads=1) as model:
        model.engine = CountingEngine(model.engine)
        _, prefills, usages = _converse(model, temperature=0.8)
        for turn, (fed, usage) in enumerate(zip(prefills, usages)):
            assert fed == usage.prompt_tokens - usage.cached_tokens
            if turn:
                # the cache held the last prompt and the reply up to where its ids, tokenized again inside the
                # template, differ from the sampled ones (a random model's are rarely the canonical ones); that can
                # be the prompt's own last token, when the reply's first characters merge with the template's "\n"
                assert usage.cached_tokens >= usages[turn - 1].prompt_tokens - 1


def test_a_greedy_turn_answers_as_a_fresh_run(model_path):
    """Greedy turns reuse the cache only up to a fixed prefill boundary whose positions were prefilled as a fresh prompt
    is, so each reply is the one a fresh process gives (issue 32)."""
    with edgeq.load(model_path, threads=1) as model:
        model.engine = CountingEngine(model.engine)
        replies, prefills, usages = _converse(model, temperature=0.0)
        history = []
        for turn, (text, reply, fed, usage) in enumerate(zip(TURNS, replies, prefills, usages)):
            history.append({"role": "user", "content": text})
            assert fed == usage.prompt_tokens - usage.cached_tokens and usage.cached_tokens % PREFILL_CHUNK == 0
            if turn:
                assert usage.cached_tokens >= usages[turn - 1].prompt_tokens // PREFILL_CHUNK * PREFILL_CHUNK
            model.engine.reset()
            fresh = model.chat(history, max_new_tokens=12, temperature=0.0)
            assert fresh.usage.cached_tokens == 0
            assert fresh.text == reply, f"turn {turn}"
            history.append({"role": "assistant", "content": reply})


def test_truncate_keeps_a_prefix_exactly(model_path):
    """Cutting the cache back and feeding other tokens gives the logits of a fresh run over the same ids."""
    a, b, c = [5, 17, 42, 99, 3], [250, 7, 64], [11, 300, 8, 120]
    with edgeq.load(model_path, threads=1) as model:
        engine = model.engine
        engine.reset()
        engine.forward(a + b)
        engine.truncate(len(a))
        assert engine.tokens == a
        cut = engine.forward(c).copy()
        assert engine.tokens == a + c
        engine.reset()
        fresh = engine.forward(a + c).copy()
        np.testing.assert_allclose(cut, fresh, atol=2e-3, rtol=1e-3)
        assert engine.tokens == a + c
        engine.truncate(0)
        assert engine.tokens == []


def test_a_repeated_prompt_feeds_one_token_unless_greedy(tiny_llama, tmp_path):
    with edgeq.load(tiny_llama, threads=1) as model:
        model.engine = CountingEngine(model.engine)
        first = model.generate("Hello fox", max_new_tokens=8)
        again = model.generate("Hello fox", max_new_tokens=8)
        assert first == again and model.stats.cached_tokens == 0  # a prompt shorter than one prefill chunk: prefilled again
        model.generate("Hello fox", max_new_tokens=8, temperature=0.9)
        calls = len(model.engine.fed)
        model.generate("Hello fox", max_new_tokens=8, temperature=0.9)
        assert model.stats.cached_tokens == model.stats.prompt_tokens - 1
        assert model.engine.fed[calls] == 1  # the prompt's last token, fed again for its logits
        model.generate_ids(model.tokenizer.encode("Hello fox"), 4)  # from an empty cache, for exact comparisons
        assert model.stats.cached_tokens == 0


def test_a_long_chat_drops_its_oldest_turns_only_when_asked(tiny_llama):
    with edgeq.load(tiny_llama, threads=1) as model:
        history = [{"role": "system", "content": "Be brief."}]
        for i in range(12):
            history += [{"role": "user", "content": f"Question {i}: " + "numbers and words " * 4},
                        {"role": "assistant", "content": "fox " * 10}]
        history.append({"role": "user", "content": "last one"})
        with pytest.raises(edgeq.EdgeqError, match="truncate=True"):
            model.chat(history, max_new_tokens=8)
        reply = model.chat(history, max_new_tokens=8, truncate=True)
        assert reply.usage.prompt_tokens + 8 <= model.engine.n_ctx


def test_run_without_a_prompt_chats_with_history(tmp_path_factory, tiny_llama):
    bundle = _bundle(tmp_path_factory, tiny_llama, "gguf")
    result = CliRunner().invoke(main, ["run", str(bundle), "--max-new-tokens", "6", "--threads", "1"], input="Hello fox\nAnd numbers?\n\n")
    assert result.exit_code == 0, result.output
    assert result.output.count(">") >= 3  # two turns answered, then the empty line ends the chat


def test_a_cancel_event_stops_the_reply_before_its_next_token(tiny_llama):
    import threading

    with edgeq.load(tiny_llama, threads=1) as model:
        cancel = threading.Event()
        # the regex keeps a random model from ending on its own before the event is set
        chunks = model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=200, stream=True, cancel=cancel,
                            response_format={"type": "regex", "pattern": "[a-z]{600}"})
        threading.Timer(0.05, cancel.set).start()
        last = list(chunks)[-1]
        assert last.finish_reason == "cancelled" and 0 < last.usage.completion_tokens < 200
