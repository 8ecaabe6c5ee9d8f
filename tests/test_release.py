"""`edgeq release`: two tiny random models × four devices (one planned, two forced precisions on built-in
and own profiles, one whose target cannot be met), locally and on a local Ray instance: the graph,
resumption, one device's change, a failing cell, the report, the same bundles under Ray."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from importlib.resources import files
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import CORPUS, build_lora, build_model

import edgeq
from edgeq.cli import main

RELEASE = """
output = "{output}"
eval_tokens = 64
eval_ctx = 64
max_kl = 5.0
{extra}

[[model]]
name = "alpha"
path = "models/alpha"

[[model]]
name = "beta"
path = "models/beta"
adapter = "models/beta-lora"

[[device]]
name = "pixel-8"              # planned for the device: sensitivity first

[[device]]
name = "raspberry-pi-5"
precision = "Q8_0"
max_kl = 0.05

[[device]]
name = "board"
profile = "board.toml"
format = "gguf"
precision = "Q4_0"
"""
STRICT = """
[[device]]
name = "strict"               # Q4_0 cannot meet this target: measured, reported, not kept
profile = "board.toml"
precision = "Q4_0"
max_kl = 1e-6
"""
MODELS = ("alpha", "beta")
PASSING = {(m, d) for m in MODELS for d in ("pixel-8", "raspberry-pi-5", "board")}
MISSING = {(m, "strict") for m in MODELS}


def builtin_profile(name: str) -> str:
    return files("edgeq.devices").joinpath(f"{name}.toml").read_text()


def write_release(folder: Path, name: str = "release.toml", output: str = "out", extra: str = "", devices: str = STRICT) -> Path:
    path = folder / name
    path.write_text(RELEASE.format(output=output, extra=extra) + devices)
    return path


def report_cells(report: dict) -> dict:
    return {(c["model"], c["device"]): c for c in report["cells"]}


def model_files(bundle: Path) -> dict:
    return {name: f["sha256"] for name, f in edgeq.inspect(bundle)["files"].items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The release built once; the tests below read it, or copy it before changing anything."""
    folder = tmp_path_factory.mktemp("release")
    build_model(folder / "models" / "alpha", seed=3)
    build_model(folder / "models" / "beta", seed=4)
    build_lora(folder / "models" / "beta-lora", folder / "models" / "beta")
    (folder / "board.toml").write_text(builtin_profile("raspberry-pi-5").replace('name = "Raspberry Pi 5 (8 GB)"', 'name = "Our board"'))
    result = edgeq.release(write_release(folder))
    return folder, result


def test_graph_measures_sensitivity_once_per_model_before_its_planned_cells(first_run):
    folder, result = first_run
    assert set(report_cells(result.report)) == PASSING | MISSING
    tasks = result.report["tasks"]
    sensitivity = [t for t in tasks if t["kind"] == "sensitivity"]
    assert sorted(t["task"] for t in sensitivity) == ["sensitivity:alpha:gguf:built-in", "sensitivity:beta:gguf:built-in"]
    assert sorted(t["task"] for t in tasks if t["kind"] == "cell") == sorted(f"cell:{m}/{d}" for m, d in PASSING | MISSING)
    cache = Path(os.environ["EDGEQ_CACHE"])
    for model in MODELS:
        measured = next(t for t in sensitivity if f":{model}:" in t["task"])
        key = edgeq.inspect(folder / "out" / model / "pixel-8")["plan"]["sensitivity"]["key"]
        (stored,) = cache.rglob(f"{key}*.json")
        # written by the sensitivity task, and never again by the planned cell, which started after it
        assert measured["started"] <= stored.stat().st_mtime <= measured["finished"]
        assert next(t for t in tasks if t["task"] == f"cell:{model}/pixel-8")["started"] >= measured["finished"]
        cells = report_cells(result.report)
        assert cells[(model, "pixel-8")]["planned"] and not cells[(model, "board")]["planned"]


def test_report_holds_every_cell_with_quality_target_estimate_and_verdict(first_run):
    folder, result = first_run
    out = folder / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["summary"] == {"cells": 8, "pass": 6, "miss": 2, "error": 0, "reused": 0}
    assert report["executor"]["kind"] == "local" and not result.ok
    bandwidth = {"pixel-8": 68.3, "raspberry-pi-5": 17.1, "board": 17.1, "strict": 17.1}
    for (model, device), cell in report_cells(report).items():
        assert cell["target"]["max_kl"] == {"raspberry-pi-5": 0.05, "strict": 1e-6}.get(device, 5.0)
        assert cell["precision"] == {"raspberry-pi-5": "Q8_0", "board": "Q4_0", "strict": "Q4_0"}.get(device, "Q4_0")
        est = cell["estimate"]
        assert est["method"] == "roofline" and est["profile"] == device.replace("strict", "board") and est["ttft_s"] > 0
        assert est["decode_tokens_per_s"] * est["decode_bytes_per_token"] == pytest.approx(bandwidth[device] * 1e9, rel=1e-3)
        if (model, device) in MISSING:
            assert cell["status"] == "miss" and cell["bundle"] is None and cell["quality"]["kl"] > 1e-6
            assert cell["misses"] == [f"KL {cell['quality']['kl']:.4f} > --max-kl 1e-06"]
            assert not (out / model / device).exists()
            continue
        bundle = out / model / device
        manifest = edgeq.inspect(bundle)
        assert cell["status"] == "pass" and cell["bundle"] == f"{model}/{device}"
        assert cell["size_bytes"] == sum(p.stat().st_size for p in bundle.iterdir())
        assert cell["quality"]["kl"] == manifest["quality"]["kl"] <= cell["target"]["max_kl"]
    cells = report_cells(report)
    # fewer bytes per token, faster: Q4_0 estimates faster than Q8_0 on the same bandwidth
    assert cells[("alpha", "board")]["estimate"]["decode_tokens_per_s"] > cells[("alpha", "raspberry-pi-5")]["estimate"]["decode_tokens_per_s"]
    page = (out / "report.html").read_text()
    rows = re.findall(r'<tr class="cell (\w+)" id="cell-([\w.-]+)--([\w.-]+)"', page)
    assert {(m, d): s for s, m, d in rows} == {**{c: "pass" for c in PASSING}, **{c: "miss" for c in MISSING}}
    assert page.count("<svg") == 1 and "roofline" in page


def test_second_run_converts_nothing_and_finishes_fast(first_run):
    folder, _ = first_run
    model_file = folder / "out" / "alpha" / "board" / "model.gguf"
    before = model_file.stat().st_mtime_ns
    start = time.perf_counter()
    run = CliRunner().invoke(main, ["release", str(folder / "release.toml")])
    seconds = time.perf_counter() - start
    assert run.exit_code == 1 and "2 of 8 cells did not pass (alpha/strict, beta/strict)" in run.output
    report = json.loads((folder / "out" / "report.json").read_text())
    assert report["tasks"] == [] and all(c["reused"] for c in report["cells"])
    assert model_file.stat().st_mtime_ns == before
    assert seconds < 10, f"second run took {seconds:.1f} s"
    # the same release without the device it cannot meet passes, still without converting anything
    run = CliRunner().invoke(main, ["release", str(write_release(folder, "passing.toml", devices=""))])
    assert run.exit_code == 0, run.output
    assert "6 of 6 cells passed, 0 missed their target, 0 failed; 6 reused" in run.output


def test_changing_one_device_profile_rebuilds_only_its_cells(first_run, tmp_path):
    folder = tmp_path / "release"
    shutil.copytree(first_run[0], folder)
    board = folder / "board.toml"
    board.write_text(board.read_text().replace("bandwidth_gbps = 17.1", "bandwidth_gbps = 34.2"))
    before = {m: model_files(folder / "out" / m / "board") for m in MODELS}
    # one worker: run settings are no input of a cell, so nothing else rebuilds (and one import of torch, not two)
    result = edgeq.release(write_release(folder, devices="", extra="[run]\nworkers = 1"))
    assert result.ok, result.table()
    assert result.report["executor"]["workers"] == 1
    assert sorted(t["task"] for t in result.report["tasks"]) == ["cell:alpha/board", "cell:beta/board"]
    for (model, device), cell in report_cells(result.report).items():
        assert cell["reused"] == (device != "board")
        if device == "board":
            assert cell["changed"] == ["device"]
            assert cell["estimate"]["bandwidth_gbps"] == 34.2
            assert model_files(folder / "out" / model / "board") == before[model]  # GGUF is deterministic


def test_a_failing_cell_fails_alone(first_run, tmp_path):
    folder = tmp_path / "release"
    shutil.copytree(first_run[0], folder)
    (folder / "board.toml").write_text(builtin_profile("raspberry-pi-5").replace("budget_gib = 6.0", 'budget_gib = "lots"'))
    run = CliRunner().invoke(main, ["release", str(write_release(folder, devices=""))])
    assert run.exit_code == 1
    assert "2 of 6 cells did not pass (alpha/board, beta/board)" in run.output
    cells = report_cells(json.loads((folder / "out" / "report.json").read_text()))
    for model in MODELS:
        assert cells[(model, "board")]["status"] == "error"
        assert "board.toml: memory.budget_gib must be a number, got 'lots'" in cells[(model, "board")]["error"]
        assert not (folder / "out" / model / "board").exists()  # the previous run's bundle is not left behind
        for device in ("pixel-8", "raspberry-pi-5"):
            assert cells[(model, device)]["status"] == "pass" and cells[(model, device)]["reused"]
            edgeq.inspect(folder / "out" / model / device)  # present, checksums intact
    page = (folder / "out" / "report.html").read_text()
    assert page.count('class="cell error"') == 2 and "budget_gib must be a number" in page


@pytest.mark.parametrize("body, message", [
    ('output = "o"\n[[model]]\nname = "a"\npath = "."\n[[device]]\nname = "pixel-8"\nprecision = "Q4_0"\nsize = "9MB"\n',
     "device[0]: precision and size exclude each other"),
    ('output = "o"\n[[model]]\nname = "a"\npath = "."\n[[device]]\nname = "pixel-8"\ncolour = "red"\n',
     "device[0].colour: Extra inputs are not permitted"),
    ('output = "o"\n[[model]]\nname = "a"\npath = "nowhere"\n[[device]]\nname = "pixel-8"\n',
     "model[0].path: folder"),
    ('output = "o"\nmax_kl = -1\n[[model]]\nname = "a"\npath = "."\n[[device]]\nname = "pixel-8"\n',
     "max_kl: Input should be greater than 0"),
    ('output = "o"\n[[model]]\nname = "a b"\npath = "."\n[[device]]\nname = "pixel-8"\n',
     "model[0].name: String should match pattern"),
    ('output = "o"\n[[model]]\nname = "a"\npath = "."\n[[device]]\nname = "x"\n[[device]]\nname = "x"\n',
     "device: name 'x' is used twice"),
    ('[[model]]\nname = "a"\npath = "."\n[[device]]\nname = "pixel-8"\n', "output: Field required"),
    ('output = "o"\n[[model]]\nname = "a"\npath = "."\n[[device]]\nname = "pixel-8"\nmin_agreement = 0.9\n',
     "model[0]: min_agreement is measured on your data; set eval_data"),
    ('output = "o"\neval_data = "release.toml"\nmin_retention = 0.9\n[[model]]\nname = "a"\npath = "."\n[[device]]\nname = "pixel-8"\n',
     "model[0]: min_retention needs the model before fine-tuning; set adapter or base"),
    ('output = "o"\nmin_retention = 1.5\n[[model]]\nname = "a"\npath = "."\n[[device]]\nname = "pixel-8"\n',
     "min_retention: Input should be less than or equal to 1"),
])
def test_release_file_errors_name_the_field(tmp_path, body, message):
    path = tmp_path / "release.toml"
    path.write_text(body)
    with pytest.raises(edgeq.EdgeqError) as err:
        edgeq.release(path)
    assert message in str(err.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_opens_in_headless_chromium(first_run):
    out = first_run[0] / "out"
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", (out / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    rows = re.findall(r'<tr class="cell (\w+)" id="cell-([\w.-]+)--([\w.-]+)"', dom)
    cells = json.loads((out / "report.json").read_text())["cells"]
    assert sorted((m, d, s) for s, m, d in rows) == sorted((c["model"], c["device"], c["status"]) for c in cells)
    assert len(rows) >= 6 and "<svg" in dom


def test_ray_release_writes_the_same_bundles(first_run):
    ray = pytest.importorskip("ray")
    folder = first_run[0]
    # its own sensitivity cache, so the Ray tasks measure it too; each cell also judged on the release's own data
    (folder / "eval.txt").write_text("\n".join(CORPUS[:4]))
    release_file = write_release(folder, "release-ray.toml", output="out-ray", extra='cache = "ray-cache"\neval_data = "eval.txt"')
    ray.init(num_cpus=2, object_store_memory=100 << 20, include_dashboard=False, logging_level="ERROR")
    try:
        result = edgeq.release(release_file, ray="auto")
    finally:
        ray.shutdown()
    report = result.report
    assert report["executor"]["kind"] == "ray"
    assert report["summary"] == {"cells": 8, "pass": 6, "miss": 2, "error": 0, "reused": 0}
    assert len([t for t in report["tasks"] if t["kind"] == "sensitivity"]) == 2
    assert any((folder / "ray-cache").rglob("*.json"))
    for model, device in PASSING:
        assert model_files(folder / "out-ray" / model / device) == model_files(folder / "out" / model / device), (model, device)
    for model, device in MISSING:
        assert not (folder / "out-ray" / model / device).exists()
    for (model, device), cell in report_cells(report).items():
        judged = cell["finetune_quality"]
        assert judged["data"]["path"] == str(folder / "eval.txt") and judged["kl"] >= 0
        assert (judged["flip_retention"] is not None) == (model == "beta")  # beta has an adapter: its base is known
        if (model, device) in MISSING:
            assert cell["misses"] == [f"KL {judged['kl']:.4f} > --max-kl 1e-06"]
    assert edgeq.inspect(folder / "out-ray" / "beta" / "board")["finetune_quality"] == report_cells(report)[("beta", "board")]["finetune_quality"]
