"""The bundle's model card: front matter the hub parses, numbers equal to the manifest's, kept out of the checksums;
and the export summary that says what is in the file."""
from __future__ import annotations

import json
import re

import pytest
import yaml
from click.testing import CliRunner

from edgeq.cli import main


def _card(bundle) -> tuple[dict, str]:
    text = (bundle / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.DOTALL)
    assert match, text[:200]
    return yaml.safe_load(match[1]), match[2]


@pytest.fixture(scope="module")
def planned(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "tiny-planned"
    result = CliRunner().invoke(main, ["export", str(tiny_llama), "--format", "gguf", "--bits-per-weight", "6", "-o", str(out),
                                       "--eval-tokens", "128"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_front_matter_parses_and_names_the_base_model(planned, tiny_llama):
    bundle, _ = planned
    meta, _ = _card(bundle)
    assert meta["base_model"] == tiny_llama.name  # a local folder without a hub id: its name
    assert meta["base_model_relation"] == "quantized" and meta["library_name"] == "gguf"
    assert {"edgeq", "gguf", "llama"} <= set(meta["tags"])


def test_quality_numbers_are_the_manifests_to_four_digits(planned):
    bundle, _ = planned
    manifest = json.loads((bundle / "edgeq.json").read_text())
    _, body = _card(bundle)
    quality = manifest["quality"]
    for label, key in (("KL divergence (nats/token)", "kl"), ("top-1 agreement", "top1"), ("perplexity", "ppl")):
        shown = re.search(rf"\| {re.escape(label)} \| ([^ |]+) \|", body)
        assert shown and float(shown[1]) == float(f"{quality[key]:.4g}"), (label, body)
    shares = dict(re.findall(r"(\w+) ([\d.]+)% \(\d+ tensors\)", body))
    assert shares and abs(sum(map(float, shares.values())) - 100) < 0.5
    assert manifest["calibration"]["sha256"][:16] in body


def test_card_is_outside_the_checksums_and_editing_it_breaks_nothing(planned):
    import edgeq

    bundle, _ = planned
    manifest = json.loads((bundle / "edgeq.json").read_text())
    assert "README.md" not in manifest["files"]
    with open(bundle / "README.md", "a") as f:
        f.write("\nNotes of my own.\n")
    edgeq.load(bundle).engine.close()  # checksums verified: the card is not among them


def test_planned_summary_names_its_mix_and_where_each_number_comes_from(planned):
    _, output = planned
    line = next(line for line in output.splitlines() if "bits/weight" in line)
    assert re.search(r"planned: (\w+ (\d+%|<1%)(, )?)+ of weights; [\d.]+ bits/weight", line), line
    check = next(line for line in output.splitlines() if line.strip().startswith("plan:"))
    assert "predicted KL" in check and "on the built-in calibration text, 256 tokens" in check and "on the same 256 tokens" in check, check


def test_library_warnings_stay_out_of_profile_output_unless_verbose(capfd):
    """`edgeq profile` measures in a fresh process, where transformers' FutureWarnings would otherwise reach the terminal."""
    import logging
    import warnings

    from edgeq.fresh_process import call_in_fresh_process

    call_in_fresh_process(warnings.warn, "`past_key_values` is deprecated", FutureWarning, doing="warning")
    assert "past_key_values" not in capfd.readouterr().err
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # what -v sets
    try:
        call_in_fresh_process(warnings.warn, "`past_key_values` is deprecated", FutureWarning, doing="warning")
    finally:
        root.setLevel(level)
    assert "past_key_values" in capfd.readouterr().err
