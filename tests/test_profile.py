"""`edgeq profile`: result structure and sanity, the labelled device estimate, JSON, PNG chart, CLI, bad input.

Timings are never asserted (the CI machine is shared); what is asserted are relations that hold on any
machine: medians inside their spread, prefill tok/s = prompt / TTFT, the estimate = measurement × the
device/machine ratio, peak memory of the fresh process rather than of the test process.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import edgeq
from edgeq.bundle import read_manifest
from edgeq.cli import main
from edgeq.devices import load_device
from edgeq.profile_report import PLOT_SIZE_PX, chart
from edgeq.profiling import rss

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PROMPTS, GEN, REPEAT = (8, 300), 4, 3  # 300 + 4 tokens do not fit the tiny model's 256-token context


@pytest.fixture(scope="module")
def bundles(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    q8 = edgeq.export(tiny_llama, format="gguf", precision="Q8_0", output=root / "tiny-q8", eval_tokens=64)
    q4 = edgeq.export(tiny_llama, format="gguf", precision="Q4_0", output=root / "tiny-q4", eval_tokens=0)
    return [q8, q4]


@pytest.fixture(scope="module")
def result(bundles):
    return edgeq.profile(bundles, prompt_tokens=PROMPTS, gen=GEN, repeat=REPEAT, threads=1, device="raspberry-pi-5")


def _check_spread(s, n):
    assert s.n == n and 0 < s.min <= s.q1 <= s.median <= s.q3 <= s.max


def test_every_bundle_measured_with_sane_numbers(result, bundles):
    assert [b.name for b in result.bundles] == ["tiny-q8", "tiny-q4"]
    assert result["tiny-q4"].path == str(bundles[1])
    for b, path in zip(result.bundles, bundles):
        manifest = read_manifest(path)
        assert b.format == "gguf" and b.runtime == "llamacpp" and b.precision == manifest["precision"]
        assert b.size_bytes == manifest["files"]["model.gguf"]["bytes"]
        assert 0 < b.weight_bytes <= b.size_bytes and b.params > 0 and b.kv_bytes_per_token == 2 * 2 * 32 * 2
        assert b.threads == 1 and b.n_ctx == 256 and b.first_load_s > 0
        _check_spread(b.load_s, REPEAT)
        short, long = b.prompts
        for s in (short.ttft_s, short.prefill_tokens_per_s, short.decode_tokens_per_s):
            _check_spread(s, REPEAT)
        assert short.prefill_tokens_per_s.median == pytest.approx(8 / short.ttft_s.median)
        assert b.decode_tokens_per_s == short.decode_tokens_per_s
        assert long.prompt_tokens == 300 and long.ttft_s is None and "context" in long.skipped and "256" in long.skipped
    assert result["tiny-q8"].kl == read_manifest(bundles[0])["quality"]["kl"]
    assert result["tiny-q4"].kl is None


def test_peak_memory_is_the_fresh_process_not_ours(result):
    # this test process holds torch and transformers; a llama.cpp process with a tiny GGUF is far smaller
    for b in result.bundles:
        assert 0 < b.baseline_rss_bytes < b.peak_rss_bytes < rss("VmRSS")


def test_device_estimate_is_labelled_and_scaled(result):
    device = load_device("raspberry-pi-5")
    for b in result.bundles:
        e = b.estimate
        assert e.kind == "estimate" and e.device == "raspberry-pi-5" and any("not measured" in n for n in e.notes)
        assert e.local_bandwidth_gbps > 0 and e.local_gflops > 0 and e.fits_budget
        short, long = e.prompts
        measured = b.prompt(8)
        assert short.decode_tokens_per_s == pytest.approx(
            measured.decode_tokens_per_s.median * device.bandwidth_gbps / e.local_bandwidth_gbps)
        assert short.prefill_tokens_per_s == pytest.approx(
            measured.prefill_tokens_per_s.median * device.cpu_gflops / e.local_gflops)
        assert short.ttft_s == pytest.approx(8 / short.prefill_tokens_per_s)
        assert short.decode_bytes_per_token == int(b.weight_bytes + b.kv_bytes_per_token * (8 + GEN / 2))
        assert short.bandwidth_efficiency > 0 and short.compute_efficiency > 0
        assert long.skipped and long.decode_tokens_per_s is None
    text = result.table()
    assert "ESTIMATE for raspberry-pi-5 (not measured)" in text and "skipped" in text


def test_decode_is_reported_against_the_bandwidth_roofline(result):
    for b in result.bundles:
        r = b.roofline
        measured = b.prompt(8).decode_tokens_per_s.median
        assert r["bytes_per_token"] == int(b.weight_bytes + b.kv_bytes_per_token * (8 + GEN / 2))
        assert r["bound_tokens_per_s"] == pytest.approx(r["bandwidth_gbps"] * 1e9 / r["bytes_per_token"], rel=1e-2)
        assert r["fraction"] == pytest.approx(measured / r["bound_tokens_per_s"], rel=3e-2)
    assert "decode / roofline" in result.table()


def test_json_and_png_show_every_bundle(result, tmp_path):
    data = json.loads(result.save_json(tmp_path / "profile.json").read_text())
    assert [b["name"] for b in data["bundles"]] == ["tiny-q8", "tiny-q4"]
    first = data["bundles"][0]
    assert first["estimate"]["kind"] == "estimate" and first["decode_tokens_per_s"]["median"] > 0
    assert first["prompts"][1]["skipped"]

    png = result.plot(tmp_path / "chart.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image
    import matplotlib.image

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == PLOT_SIZE_PX
    assert matplotlib.image.imread(png).shape[:2] == PLOT_SIZE_PX[::-1]
    labels = " ".join(t.get_text() for t in chart(result).axes[0].texts)
    for b in result.bundles:
        assert b.name in labels and b.precision in labels


def test_cli_profile_writes_table_json_and_png(bundles, tmp_path):
    out_json, out_png = tmp_path / "p.json", tmp_path / "p.png"
    result = CliRunner().invoke(main, ["profile", *map(str, bundles), "--prompt-tokens", "8", "--gen", "2", "--repeat", "1",
                                       "--threads", "1", "--device", "x86-64-laptop", "--json", str(out_json), "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    assert "tiny-q8" in result.output and "tiny-q4" in result.output and "ESTIMATE for x86-64-laptop" in result.output
    data = json.loads(out_json.read_text())
    assert data["prompt_tokens"] == [8] and data["gen"] == 2 and data["device"] == "x86-64-laptop"
    assert all(b["estimate"]["kind"] == "estimate" for b in data["bundles"])
    assert out_png.read_bytes()[:8] == PNG_SIGNATURE


def test_torch_reference_through_the_same_engine_protocol(tiny_llama):
    b = edgeq.profile(tiny_llama, prompt_tokens=(8,), gen=2, repeat=1, threads=1).bundles[0]
    assert b.runtime == "torch" and b.kl == 0.0 and b.decode_tokens_per_s.median > 0
    assert b.params == sum(int(np.prod(s)) for s in edgeq.intake.open_model(tiny_llama).shapes().values())


@pytest.mark.parametrize("kwargs, needle", [
    ({"prompt_tokens": [0]}, "positive token counts"),
    ({"gen": 0}, "gen must be"),
    ({"repeat": -1}, "repeat must be"),
    ({"device": "raspberry-pi-6"}, "did you mean 'raspberry-pi-5'"),
    ({"machine": {"threads": 1, "bandwidth_gbps": 12.0}}, "machine must hold positive threads, bandwidth_gbps, gflops"),
])
def test_bad_arguments_fail_before_measuring(bundles, kwargs, needle):
    with pytest.raises(edgeq.EdgeqError, match=needle):
        edgeq.profile(bundles, **kwargs)


def test_a_machine_measured_beforehand_is_used_without_probing_it_again(bundles):
    """`/usr/bin/time` counts the bandwidth probes' processes in a profile's peak memory; given the machine, none runs."""
    result = edgeq.profile(bundles[1], prompt_tokens=(8,), gen=GEN, repeat=1, threads=1, device="raspberry-pi-5",
                           machine={"threads": 1, "bandwidth_gbps": 123.0, "gflops": 45.0})
    b = result.bundles[0]
    assert b.roofline["bandwidth_gbps"] == 123.0
    assert (b.estimate.local_bandwidth_gbps, b.estimate.local_gflops) == (123.0, 45.0)


def test_bad_input_one_line_and_nothing_written(bundles, tmp_path):
    with pytest.raises(edgeq.EdgeqError, match="not an edgeq bundle"):
        edgeq.profile([bundles[0], tmp_path])
    with pytest.raises(edgeq.EdgeqError, match="no bundle"):
        edgeq.profile([])
    for args, needle in ((["--prompt-tokens", "64,lots"], "--prompt-tokens"),
                         (["--json", str(tmp_path / "missing" / "p.json")], "does not exist")):
        result = CliRunner().invoke(main, ["profile", str(bundles[0]), *args])
        assert result.exit_code in (1, 2) and result.output.count("\n") == 1 and needle in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_profile_with_a_draft_reports_acceptance_and_a_device_speedup(bundles):
    """The model drafting for itself: drafting as deep as allowed, its greedy guesses are right; but each guess costs a
    whole read of the weights, so even on a phone, where a pass costs about a step, the estimate gains nothing."""
    q8 = bundles[0]
    result = edgeq.profile(q8, prompt_tokens=(8,), gen=24, repeat=1, threads=1, device="pixel-8", draft=str(q8))
    spec = result.bundles[0].speculation
    assert spec["passes"] > 0 and spec["accepted_per_pass"] > 1 and spec["acceptance"] > 0.5 and spec["adaptive_passes"] >= 0
    assert spec["plain_tokens_per_s"] > 0 and spec["speculative_tokens_per_s"] > 0
    assert spec["device"]["speedup"] < 1.05
    assert "speculative decoding on a built-in copying prompt" in result.table() and "ESTIMATE on pixel-8" in result.table()


def test_device_speedup_follows_bandwidth_and_compute():
    from edgeq.profile_speculation import device_speedup

    lookup = {"acceptance": 0.8, "draft_tokens": 8, "draft_bytes": 0}
    phone = device_speedup(lookup, weight_bytes=1e9, params=1.5e9, bandwidth_gbps=60, gflops=1000)  # reading dominates
    busy = device_speedup(lookup, weight_bytes=1e9, params=1.5e9, bandwidth_gbps=60, gflops=50)     # computing dominates
    assert phone["pass_over_step"] == 1.0 and phone["speedup"] > 2.5 and phone["depth"] >= 4
    assert busy["pass_over_step"] > 1.5 and 1.0 <= busy["speedup"] < phone["speedup"] and busy["depth"] < phone["depth"]
    assert device_speedup({**lookup, "acceptance": 0.0}, 1e9, 1.5e9, 60, 1000) == {"depth": 0, "speedup": 1.0, "pass_over_step": 1.0}
