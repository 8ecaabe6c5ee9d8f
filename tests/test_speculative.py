"""Speculative decoding: the same tokens as plain decoding (greedy, under a grammar too), the same distribution when
sampling, on llama.cpp, onnxruntime and torch; drafters and their refusals."""
from __future__ import annotations

import json
import logging
import re

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
        spec = model.speculation
        assert spec.step_s > 0 and {2, 3} <= set(spec.verify_s) and spec.draft_s > 0  # costs timed at load
        spec.fixed_depth = True  # as deep as allowed, whatever a pass costs on this machine: exactness at depth
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
        assert "not smaller than its target" in caplog.text and re.search(r"a draft step takes [\d.]+ ms and a target step [\d.]+ ms", caplog.text)
    if engine == "gguf":
        assert model.speculation.exact_width > 1
    if engine == "onnx":  # a 1-row run differs from every batch, which agree: greedy steps go as 2-row batches
        assert model.speculation.paired and model.speculation.exact_width > 1


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


def test_prompt_lookup_drafts_what_followed_the_longest_then_latest_match():
    from edgeq.speculative import LookupDrafter

    lookup = LookupDrafter()
    assert lookup.propose([1, 2, 3, 4, 9, 2, 3], [], 3) == [4, 9, 2] and lookup.kind == "copy2"
    assert lookup.propose([1, 2, 3, 7, 2, 3, 8, 5, 2, 3], [], 2) == [8, 5]  # the latest match wins
    assert lookup.propose([5, 2, 3, 1, 7, 2, 3, 9, 5, 2, 3], [], 2) == [1, 7]  # ... after the longest
    assert lookup.propose([5, 6], [6, 7, 8, 9], 2) == [7, 8] and lookup.kind == "predicted1"  # a prediction first
    assert lookup.propose([4, 1, 4], [], 2) == [1, 4] and lookup.kind == "copy1"
    assert lookup.propose([1, 2, 3], [], 4) == [] and lookup.kind == "none"


def test_prompt_lookup_follows_the_span_it_copies():
    """Once the reply copies a span, guesses continue along it (longer agreement, another kind) even where its last
    tokens also occur later; a token off the span ends it."""
    from edgeq.speculative import LookupDrafter

    source = [1, 2, 3, 4, 5, 6, 9, 3, 4, 7, 8, 0]
    lookup = LookupDrafter(longest=2)
    assert lookup.propose(source + [1, 2], [], 3) == [3, 4, 5] and lookup.kind == "copy2"
    assert lookup.propose(source + [1, 2, 3, 4], [], 3) == [5, 6, 9] and lookup.kind == "copy4"  # not [7, 8] after 3, 4
    assert lookup.propose(source + [1, 2, 3, 4, 5, 6, 9, 3], [], 2) == [4, 7] and lookup.kind == "copy8"
    assert lookup.propose(source + [1, 2, 3, 4, 5, 6, 9, 3, 4, 2], [], 2) == [3, 4] and lookup.kind == "copy1"  # off the span


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


STEP = 0.010
THIS_CPU = {2: 1.16, 3: 1.47, 4: 1.66, 5: 2.26, 6: 2.51, 7: 2.84}  # a Q4_K_M pass of w tokens in steps, measured here


def _fed(costs, passes=(), draft_step=0.0):
    """A policy fed a step's cost, passes of each width (seconds) and passes' outcomes (kind, drafted, accepted)."""
    from edgeq.speculation import SURE, Speculation
    from edgeq.speculative import LookupDrafter

    spec = Speculation(LookupDrafter(), draft_tokens=8)
    spec.learn_step(STEP)
    for width, steps in costs.items():
        for _ in range(SURE):  # timed often enough to be trusted
            spec.learn("warm-up", width - 1, 0, steps * STEP, (width - 1) * draft_step)
    for kind, drafted, accepted in passes:
        spec.learn(kind, drafted, accepted, 9.0, 9.0)  # outcomes only: slower than any width's fastest pass
    spec.learn_step(STEP)  # a step just timed: the next token may be drafted
    return spec


def test_depth_follows_expected_tokens_per_unit_of_time():
    from edgeq.speculation import Speculation
    from edgeq.speculative import LookupDrafter

    fresh = Speculation(LookupDrafter(), draft_tokens=8)
    assert fresh.top(widest=9, room=100) == 0  # no step timed yet: a plain step first
    always, never = [("copy16", 6, 6)] * 20, [("copy1", 6, 0)] * 20
    phone = _fed({w: 1 + 0.03 * (w - 1) for w in range(2, 10)}, always + never)  # bandwidth-bound
    assert phone.top(9, 100) == 8 and phone.top(7, 100) == 6 and phone.top(9, 2) == 2  # exact width and room bound it
    assert phone.depth("copy16", 8) == 8  # a pass costs about a step: as deep as allowed
    assert phone.depth("copy1", 8) == 0   # but not for a kind that never holds
    cpu = _fed(THIS_CPU, always + never)
    deep = cpu.depth("copy16", 6)
    assert 2 <= deep <= 6 and cpu.rate("copy16", deep) == max(cpu.rate("copy16", k) for k in range(1, 7))
    assert cpu.depth("copy1", 6) == 0
    linear = _fed({w: float(w) for w in range(2, 10)}, always)
    assert linear.depth("copy16", 8) == 0  # a pass costs as many steps as it holds tokens: nothing can pay
    # a kind that holds twice and then drifts earns a short draft where a pass is about a step
    drifts = _fed({w: 1 + 0.03 * (w - 1) for w in range(2, 10)}, [("copy2", 6, 2)] * 30)
    assert drifts.depth("copy2", 8) in (2, 3)


def test_a_kind_not_worth_drafting_is_probed_again_now_and_then():
    spec = _fed(THIS_CPU, [("copy1", 4, 0)] * 20)
    chances = [spec.depth("copy1", 6) for _ in range(100)]
    probes = [i for i, d in enumerate(chances) if d]
    assert probes == [31, 63, 95] and {chances[i] for i in probes} == {2}
    for _ in range(30):  # the text turns copyable: the probes see it, and drafting comes back
        spec.learn("copy1", 2, 2, 9.0, 0.0)
    assert spec.depth("copy1", 6) > 0


def test_a_drafter_whose_costs_cannot_pay_is_left_alone_ever_longer():
    """A draft model whose every guessed token costs most of a step: no depth pays even if every guess held, so it
    is not prefilled for a request and probed ever more rarely, until its costs fall."""
    dear = _fed(THIS_CPU, [("model", 2, 2)] * 10, draft_step=0.8 * STEP)
    assert not dear.can_pay(6) and not dear.worth_preparing() and dear.depth("model", 6) == 0
    probes = [i for i in range(4000) if dear.depth("model", 6)]
    gaps = np.diff(probes).tolist()
    assert gaps == sorted(gaps) and gaps[-1] == 1024 and len(probes) < 8
    cheap = _fed(THIS_CPU, [("model", 2, 2)] * 10, draft_step=0.1 * STEP)
    assert cheap.can_pay(6) and cheap.worth_preparing() and cheap.depth("model", 6) > 0
