"""The fine-tune's own data: chats rendered and masked to assistant tokens, retention metrics checked against a
direct computation, quality targets that plan the smallest passing bundle or fail leaving nothing, and --size
as the size on disk."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgeq
from edgeq.eval_data import read_dataset
from edgeq.intake import open_model
from edgeq.runtimes.torch import TorchEngine

CHATS = [
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a fox colour."},
     {"role": "assistant", "content": "Red, mostly."}],
    [{"role": "user", "content": "What runs on phones?"}, {"role": "assistant", "content": "Small language models."},
     {"role": "user", "content": "And on boards?"}, {"role": "assistant", "content": "The same, at the edge."}],
    [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": "return a + b"}],
    [{"role": "user", "content": "Count: 0 1 2"}, {"role": "assistant", "content": "3 4 5 6 7 8 9"}],
]


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS * 3))
    return path


def test_chats_score_exactly_the_assistant_tokens(tiny_llama, chats):
    tokenizer = open_model(tiny_llama).chat_tokenizer()
    data = read_dataset(chats, tokenizer, tokens=10_000, ctx=256)
    assert data.kind == "chat" and len(data.samples) == len(CHATS) * 3
    sample = data.samples[1]
    scored = [sample.ids[t + 1] for t in np.flatnonzero(sample.targets)]
    expected = []
    for reply in ("Small language models.", "The same, at the edge."):
        expected += tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.token_id("<|im_end|>")]
    assert scored == expected  # each reply and the end of its turn, nothing of the prompts
    assert sample.prompt == CHATS[1][:3]


def test_prompt_completion_lines_are_chats(tiny_llama, tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "Name a fox colour.", "completion": "Red."}) + "\n")
    data = read_dataset(path, open_model(tiny_llama).chat_tokenizer())
    assert data.kind == "prompt-completion" and data.scored_tokens == len(open_model(tiny_llama).chat_tokenizer().encode("Red.", False)) + 1


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n', "line 2"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant turn"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', r"messages\[0\] needs a role"),
    ('{"text": "hi"}\n', "line 1"),
    ("", "empty"),
])
def test_bad_data_is_one_line_naming_the_problem(tiny_llama, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(edgeq.EdgeqError, match=message) as excinfo:
        read_dataset(path, open_model(tiny_llama).chat_tokenizer())
    assert "\n" not in str(excinfo.value)


def test_long_chats_are_cut_with_a_warning(tiny_llama, tmp_path, caplog):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "fox " * 300}, {"role": "assistant", "content": "dog " * 50}]}) + "\n"
                    + json.dumps({"messages": CHATS[0]}) + "\n")
    tokenizer = open_model(tiny_llama).chat_tokenizer()
    short = len(tokenizer.encode_chat(CHATS[0], add_generation_prompt=False))
    data = read_dataset(path, tokenizer, ctx=short + 8)
    assert data.truncated == 1 and all(len(s.ids) <= short + 8 for s in data.samples)
    assert "cut to fit" in caplog.text


def _direct_metrics(tiny_llama, tiny_lora, bundle, data):
    """Flip retention and noise-to-shift computed straight from the three models' logits."""
    ft, base = TorchEngine(open_model(tiny_llama, adapter=tiny_lora)), TorchEngine(open_model(tiny_llama))
    noise, shift, keep = [], [], []
    with edgeq.load(bundle) as lm:
        for sample in data.samples:
            rows = np.flatnonzero(sample.targets)
            f, b, c = (torch.log_softmax(torch.from_numpy(np.asarray(e.score(sample.ids)))[rows], -1)
                       for e in (ft, base, lm.engine))
            noise += (f.exp() * (f - c)).sum(-1).tolist()
            shift += (f.exp() * (f - b)).sum(-1).tolist()
            flips = f.argmax(-1) != b.argmax(-1)
            keep += (c.argmax(-1) == f.argmax(-1))[flips].tolist()
    return float(np.mean(keep)), float(np.mean(noise) / np.mean(shift))


def test_retention_metrics_match_a_direct_computation(tiny_llama, tiny_lora, chats, tmp_path):
    bundle = edgeq.export(tiny_llama, adapter=tiny_lora, format="gguf", precision="Q4_0", output=tmp_path / "q4", eval_tokens=0,
                          eval_data=chats)
    stored = edgeq.inspect(bundle)["finetune_quality"]
    measured = edgeq.evaluate(bundle, eval_data=chats).to_dict()
    retention, ratio = _direct_metrics(tiny_llama, tiny_lora, bundle, read_dataset(chats, open_model(tiny_llama).chat_tokenizer()))
    for q in (stored, measured):
        assert q["flip_retention"] == pytest.approx(retention, abs=1e-6)
        assert q["noise_to_shift"] == pytest.approx(ratio, rel=1e-4)
        assert q["flips"] > 0 and 0 <= q["agreement"]["exact_match"] <= 1 and 0 <= q["agreement"]["chrf"] <= 100
    f32 = edgeq.export(tiny_llama, adapter=tiny_lora, format="gguf", precision="F32", output=tmp_path / "f32", eval_tokens=0, eval_data=chats)
    exact = edgeq.inspect(f32)["finetune_quality"]
    assert exact["flip_retention"] == 1.0 and exact["noise_to_shift"] < 1e-3 < stored["noise_to_shift"]


def test_a_retention_target_plans_the_smallest_passing_bundle(tiny_llama, tiny_lora, chats, tmp_path):
    bundle = edgeq.export(tiny_llama, adapter=tiny_lora, format="gguf", eval_data=chats, min_retention=0.95,
                          output=tmp_path / "target", eval_tokens=0)
    manifest = edgeq.inspect(bundle)
    assert manifest["finetune_quality"]["flip_retention"] >= 0.95 and manifest["targets"]["met"]
    # the random tiny fine-tune keeps 0.95 of its flips only near F16 (Q8_0: about 0.86), so the search must stop
    # short of all-F16 with a mix, not take the largest plan
    f16 = edgeq.export(tiny_llama, adapter=tiny_lora, format="gguf", precision="F16", output=tmp_path / "f16", eval_tokens=0)
    size = sum(f["bytes"] for f in manifest["files"].values())
    assert size < sum(f["bytes"] for f in edgeq.inspect(f16)["files"].values())
    assert len({e["precision"] for e in manifest["plan"]["entries"]}) > 1


def test_a_target_that_cannot_be_met_fails_and_leaves_nothing(tiny_llama, tiny_lora, chats, tmp_path):
    q4 = edgeq.export(tiny_llama, adapter=tiny_lora, format="gguf", precision="Q4_0", output=tmp_path / "q4", eval_tokens=0)
    q4_size = sum(p.stat().st_size for p in q4.rglob("*") if p.is_file())
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(edgeq.EdgeqError, match=r"misses its target: flip retention .* < --min-retention 1.0.*nothing was written"):
        edgeq.export(tiny_llama, adapter=tiny_lora, format="gguf", eval_data=chats, min_retention=1.0, size=int(q4_size * 1.1),
                     output=out / "b", eval_tokens=0)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_a_planned_size_is_the_size_on_disk(tiny_llama, tmp_path, fmt):
    budget = 150_000
    bundle = edgeq.export(tiny_llama, format=fmt, size=budget, output=tmp_path / fmt, eval_tokens=0, rounding="nearest" if fmt == "onnx" else None)
    on_disk = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert on_disk <= budget
