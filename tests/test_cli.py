"""The CLI: argument mapping, exit codes, one-line errors, and nothing left behind on failure."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from edgeq.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny-q8"
    result = _run("export", tiny_llama, "--format", "gguf", "--precision", "Q8_0", "-o", out, "--eval-tokens", "128")
    assert result.exit_code == 0, result.output
    return out


def test_devices_lists_builtins():
    result = _run("devices", "--json")
    ids = {d["id"] for d in json.loads(result.stdout)}
    assert {"iphone-15-pro", "pixel-8", "galaxy-s24", "raspberry-pi-5", "macbook-air-m2", "jetson-orin-nano", "x86-64-laptop"} <= ids


def test_help_explains_every_option():
    result = _run("export", "--help")
    for option in ("--device", "--adapter", "--format", "--precision", "--calibration", "--output", "--trust-pickle"):
        assert option in result.output


def test_run_inspect_eval(bundle):
    result = _run("run", bundle, "Hello", "--max-new-tokens", "8", "--raw")
    assert result.exit_code == 0, result.output
    assert "Q8_0" in _run("inspect", bundle).output
    quality = json.loads(_run("eval", bundle, "--tokens", "128", "--ctx", "64", "--json").stdout)
    assert {"kl", "top1", "ppl", "ppl_ref", "tokens"} <= set(quality) and quality["kl"] < 0.05


@pytest.mark.parametrize("case", ["missing-config", "unknown-device", "malformed-device", "unwritable", "truncated", "pickle", "foreign-adapter",
                                  "unknown-tensor", "tensor-type-in-a-plan"])
def test_bad_input_one_line_nothing_written(case, tiny_llama, tiny_lora, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    out = tmp_path / "out"
    args = ["export", model, "--format", "gguf", "--precision", "Q8_0", "-o", out, "--eval-tokens", "0"]
    expected = {
        "missing-config": "config.json", "unknown-device": "pixle-8", "malformed-device": "memory",
        "unwritable": "not writable", "truncated": "truncated", "pickle": "--trust-pickle", "foreign-adapter": "trained on",
        "unknown-tensor": "model.layers.9.mlp.up_proj.weight", "tensor-type-in-a-plan": "--precision",
    }[case]
    if case == "missing-config":
        (model / "config.json").unlink()
    elif case == "unknown-device":
        args += ["--device", "pixle-8"]
    elif case == "malformed-device":
        device = tmp_path / "phone.toml"
        device.write_text('name = "x"\nkind = "phone"\nos = "android"\n[memory]\nram_gib = "lots"\n')
        args += ["--device", device]
    elif case == "unwritable":
        args[args.index(out)] = "/proc/edgeq-bundle"
    elif case == "truncated":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-64])
    elif case == "pickle":
        (model / "model.safetensors").rename(model / "pytorch_model.bin")
    elif case == "foreign-adapter":
        from conftest import build_model

        shutil.rmtree(model)
        build_model(model, intermediate_size=96)
        args += ["--adapter", tiny_lora]
    elif case == "unknown-tensor":
        args += ["--tensor-type", "model.layers.9.mlp.up_proj.weight=Q8_0"]
    elif case == "tensor-type-in-a-plan":
        args = [a for a in args if a not in ("--precision", "Q8_0")] + ["--size", "1MB", "--tensor-type", "lm_head.weight=Q8_0"]
    before = sorted(p.name for p in tmp_path.iterdir())
    _assert_one_line_error(_run(*args), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no bundle, no stray files


def test_tampered_bundle_refused(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "tokenizer.json", "a") as f:
        f.write(" ")
    _assert_one_line_error(_run("run", copy, "Hi", "--max-new-tokens", "2"), "checksum")


def test_interrupt_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    from edgeq.converters.gguf import convert as gguf_converter

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_converter, "quantize", interrupted)
    result = _run("export", tiny_llama, "--format", "gguf", "--precision", "Q4_0", "-o", tmp_path / "out", "--eval-tokens", "0")
    assert result.exit_code == 130 and "interrupted" in result.output
    assert list(tmp_path.iterdir()) == []
