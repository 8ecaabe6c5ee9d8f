"""Speculative decoding: the same tokens as plain decoding (greedy, under a grammar too), the same distribution when
sampling, on llama.cpp, onnxruntime and torch; drafters and their refusals."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import edgeq
from edgeq.sampling import SamplingParams

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "why": {"type": "string", "maxLength": 40}},
          "required": ["answer", "why"], "additionalProperties": False}
JSON = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
HI = [{"role": "user", "content": "Hello fox, tell me about numbers and words."}]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("spec")
    out = {"gguf": edgeq.export(tiny_llama, format="gguf", precision="Q8_0", output=root / "q8", eval_tokens=0), "torch": tiny_llama}
    out["onnx"] = edgeq.export(tiny_llama, format="onnx", precision="fp32", output=root / "onnx", eval_tokens=0)
    out["executorch"] = edgeq.export(tiny_llama, format="executorch", precision="fp32", output=root / "pte", eval_tokens=0)
    return out


@pytest.mark.parametrize("engine", ["gguf", "onnx", "torch", "executorch"])
def test_forward_all_appends_every_position_and_returns_its_logits(bundles, engine):
    ids = [5, 17, 42, 99, 3, 250, 7, 64]
    with edgeq.load(bundles[engine], threads=1) as model:
        e = model.engine
        e.reset()
        e.forward(ids[:3])
        rows = np.array(e.forward_all(ids[3:]))
        assert rows.shape == (5, e.n_vocab) and e.tokens == ids
        e.truncate(3)
        singles = np.stack([np.array(e.forward([t])) for t in ids[3:]])
        np.testing.assert_allclose(rows, singles, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine", ["gguf", "onnx", "torch"])
def test_greedy_speculation_gives_plain_decoding_tokens(bundles, engine, caplog):
    """The draft is the model itself (every greedy guess right, until the grammar or a tie says otherwise), and prompt
    lookup over a wrong prediction (guesses rejected): both give plain decoding's tokens, with and without a schema."""
    with edgeq.load(bundles[engine], threads=1, draft=bundles[engine], draft_tokens=6) as model, caplog.at_level(logging.WARNING):
        model.speculation.fixed_depth = True  # as deep as allowed, whatever a pass costs on this machine: exactness at depth
        for response_format in (None, JSON):
            plain = model.chat(HI, max_new_tokens=40, response_format=response_format, speculative=False)
            drafted = model.chat(HI, max_new_tokens=40, response_format=response_format)
            looked_up = model.chat(HI, max_new_tokens=40, response_format=response_format, prediction=plain.text[::-1] + plain.text[:12])
            assert drafted.text == plain.text == looked_up.text, response_format
            assert plain.usage.speculative_passes == 0
            if response_format and plain.finish_reason == "stop":
                json.loads(plain.text)
            if model.speculation.exact_width > 1:  # the engine verifies in one pass what single steps compute, bit for bit
                assert drafted.usage.speculative_passes > 0 and drafted.usage.accepted_prediction_tokens > 0
                assert drafted.usage.completion_tokens < 2 * drafted.usage.speculative_passes + 40
            else:  # it does not: greedy speculation is off, and says why
                assert drafted.usage.speculative_passes == 0 and "greedy speculation is off" in caplog.text
        assert "not smaller than its target" in caplog.text
    if engine == "gguf":
        assert model.speculation.exact_width > 1


def test_speculative_sampling_keeps_the_distribution(bundles):
    """Token frequencies at the first positions of 400 seeded replies: plain sampling vs speculative sampling with the
    model drafting for itself (its greedy guesses are often, not always, what sampling keeps)."""
    with edgeq.load(bundles["gguf"], threads=1, draft=bundles["gguf"], draft_tokens=3) as model:
        model.speculation.fixed_depth = True
        ids = model.tokenizer.prompt_ids(messages=HI)
        runs = {True: [], False: []}
        passes = accepted = 0
        for seed in range(400):
            for speculative in (True, False):
                params = SamplingParams(temperature=0.7, top_k=3, seed=seed)
                runs[speculative].append(tuple(model.generate_ids(ids, 3, params, speculative=speculative)))
                if speculative:
                    passes += model.stats.speculative_passes
                    accepted += model.stats.accepted_tokens
        assert passes > 100 and 0 < accepted < 3 * passes
        for position in (1, 2):
            spec = _frequencies([r[position] for r in runs[True] if len(r) > position])
            plain = _frequencies([r[position] for r in runs[False] if len(r) > position])
            distance = 0.5 * sum(abs(spec.get(t, 0) - plain.get(t, 0)) for t in set(spec) | set(plain))
            assert distance < 0.1, (position, spec, plain)
        # a rule that kept every guess would put its greedy token far above its share
        greedy = model.generate_ids(ids, 3)
        kept_all = sum(r[1] == greedy[1] for r in runs[False]) / 400
        assert kept_all < 0.9


def _frequencies(tokens):
    values, counts = np.unique(tokens, return_counts=True)
    return dict(zip(values.tolist(), (counts / counts.sum()).tolist()))


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    from edgeq.speculative import LookupDrafter

    lookup = LookupDrafter()
    assert lookup.propose([1, 2, 3, 4, 9, 2, 3], [], 3) == [4, 9, 2]
    assert lookup.propose([1, 2, 3, 7, 2, 3, 8, 5, 2, 3], [], 2) == [8, 5]  # the latest match wins
    assert lookup.propose([5, 6], [6, 7, 8, 9], 2) == [7, 8]  # a prediction is looked up first
    assert lookup.propose([4, 1, 4], [], 2) == []  # a lone token is not looked up in the history
    assert lookup.propose([1, 2, 3], [], 4) == []


def test_bad_drafts_are_refused_in_one_line(bundles, tiny_sentencepiece_llama):
    with pytest.raises(edgeq.EdgeqError, match=r"another vocabulary .* token \d+ is"):
        edgeq.load(bundles["gguf"], threads=1, draft=tiny_sentencepiece_llama)
    for bad in (0, 33, 2.5, True):
        with pytest.raises(edgeq.EdgeqError, match="draft_tokens must be an integer from 1 to 32"):
            edgeq.load(bundles["gguf"], threads=1, draft="lookup", draft_tokens=bad)
    with edgeq.load(bundles["gguf"], threads=1) as model, pytest.raises(edgeq.EdgeqError, match="needs a drafter"):
        model.chat(HI, max_new_tokens=4, speculative=True)


def test_usage_reports_predictions_as_openai_does(bundles):
    with edgeq.load(bundles["gguf"], threads=1, draft="lookup") as model:
        model.speculation.fixed_depth = True  # whatever passes cost on this machine
        plain = model.complete("numbers and words numbers and words numbers", max_new_tokens=24)
        reply = model.complete("numbers and words numbers and words numbers", max_new_tokens=24, prediction={"type": "content", "content": plain.text})
        assert reply.text == plain.text
        details = reply.usage.to_dict()["completion_tokens_details"]
        assert details["accepted_prediction_tokens"] == reply.usage.accepted_prediction_tokens > 0
        assert details["speculative_passes"] == reply.usage.speculative_passes > 0


def test_run_with_a_draft_prints_what_it_prints_without(bundles):
    from click.testing import CliRunner

    from edgeq.cli import main

    args = ["run", str(bundles["gguf"]), "Hello fox, numbers and words", "--max-new-tokens", "16", "--threads", "1"]
    plain = CliRunner().invoke(main, args)
    drafted = CliRunner().invoke(main, [*args, "--draft", "lookup", "--draft-tokens", "3"])
    assert plain.exit_code == drafted.exit_code == 0 and plain.output == drafted.output
    bad = CliRunner().invoke(main, [*args, "--draft", "lookup", "--draft-tokens", "0"])
    assert bad.exit_code == 2 and "1<=x<=32" in bad.output


def test_depth_adapts_to_acceptance_and_to_what_a_pass_costs():
    from edgeq.speculative import LookupDrafter, Speculation

    spec = Speculation(LookupDrafter(), draft_tokens=8)
    assert spec.depth(widest=9, room=100) == 0  # no step timed yet: a plain step first
    spec.learn_step(0.010)
    spec.acceptance = 0.9
    cheap = spec.depth(9, 100)  # no pass timed yet: assumed cheap
    assert cheap >= 4 and spec.depth(4, 100) == 3 and spec.depth(9, 2) == 2  # the exact width and the room bound it
    for width in range(2, 10):
        spec.learn(width - 1, width - 1, width, 0.010 * width)  # a pass costs as many steps as it holds tokens
    spec.acceptance = 0.5
    assert spec.depth(9, 100) == 0  # compute-bound and guesses half right: plain decoding is faster
    spec.pass_s = {w: 0.011 for w in range(2, 10)}  # bandwidth-bound: a pass costs about a step
    assert spec.depth(9, 100) >= 3
