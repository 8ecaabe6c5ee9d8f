import json
import re

import pytest

from edgeq import registry
from edgeq.devices import DeviceProfile, list_devices, load_device
from edgeq.errors import EdgeqError

BUILTINS = {"iphone-15-pro", "pixel-8", "galaxy-s24", "raspberry-pi-5", "macbook-air-m2",
            "jetson-orin-nano", "x86-64-laptop"}

VALID = """\
name = "My board"
kind = "sbc"
os = "linux"

[memory]
ram_gib = 4
budget_gib = 2.5
bandwidth_gbps = 8.5

[compute]
cpu = "4x Cortex-A55"
cores = 4
threads = 4
cpu_gflops = 30.0

[runtime]
formats = ["gguf"]
context_length = 1024
[runtime.precisions]
gguf = ["Q4_0", "Q8_0"]
"""


def write(tmp_path, text, name="board.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtins_are_listed_sorted():
    ids = list_devices()
    assert ids == sorted(ids)
    assert set(ids) == BUILTINS


@pytest.mark.parametrize("device_id", sorted(BUILTINS))
def test_builtin_loads_and_is_sane(device_id):
    d = load_device(device_id)
    assert isinstance(d, DeviceProfile) and d.id == device_id and d.source.endswith(f"{device_id}.toml")
    assert 0 < d.budget_gib <= d.ram_gib
    assert d.budget_bytes == int(d.budget_gib * 2**30)
    assert 1 <= d.threads <= d.cores * 2
    assert d.bandwidth_gbps > 0 and d.cpu_gflops > 0 and d.context_length > 0
    assert d.formats and set(d.precisions) == set(d.formats)
    for fmt, names in d.precisions.items():
        assert names and set(names) <= set(registry.formats.get(fmt).device_precisions())
    assert all(re.fullmatch(r"Q\d_(0|K|K_M)|F16", n) for n in d.precisions.get("gguf", ()))
    manifest = json.loads(json.dumps(d.to_dict()))
    assert manifest["id"] == device_id and "source" not in manifest
    assert manifest["formats"] == list(d.formats)


def test_arm_devices_prefer_q4_0_on_cpu():
    for device_id in ("pixel-8", "galaxy-s24", "raspberry-pi-5"):
        assert load_device(device_id).precisions["gguf"][0] == "Q4_0"


def test_unknown_name_suggests_close_match():
    with pytest.raises(EdgeqError, match=r"device 'pixle-8' not found \(did you mean 'pixel-8'\?\); "
                                         r"known: galaxy-s24, .*or pass a path to a \.toml file"):
        load_device("pixle-8")


def test_unknown_name_without_close_match_lists_known():
    with pytest.raises(EdgeqError) as e:
        load_device("toaster")
    assert "did you mean" not in str(e.value) and "raspberry-pi-5" in str(e.value)


def test_user_file_loads_from_path(tmp_path):
    path = write(tmp_path, VALID)
    for arg in (path, str(path)):
        d = load_device(arg)
        assert (d.id, d.name, d.ram_gib, d.accelerator) == ("board", "My board", 4.0, "")
        assert d.precisions == {"gguf": ("Q4_0", "Q8_0")} and d.source == str(path)


def test_missing_user_file(tmp_path):
    with pytest.raises(EdgeqError, match="not found"):
        load_device(tmp_path / "nope.toml")


@pytest.mark.parametrize("old, new, expected", [
    ("bandwidth_gbps = 8.5\n", "", r"memory\.bandwidth_gbps is missing"),
    ("budget_gib = 2.5", "budget_gib = 6", r"memory\.budget_gib = 6\.0 exceeds memory\.ram_gib = 4\.0"),
    ('formats = ["gguf"]', 'formats = ["gguf", "tflite"]', r"runtime\.formats 'tflite' is not one of"),
    ("ram_gib = 4", "ram_gib = -4", r"memory\.ram_gib must be > 0"),
    ("cores = 4", 'cores = "four"', r"compute\.cores must be an integer"),
    ('kind = "sbc"', 'kind = "toaster"', r"kind 'toaster' is not one of"),
    ('"Q4_0", "Q8_0"', '"q4_0"', r"runtime\.precisions\.gguf 'q4_0' is not one of"),
    ("[runtime.precisions]", '[runtime.precisions]\nonnx = ["int8"]', r"runtime\.precisions\.onnx is given"),
    ("ram_gib = 4", "ram_gib = 4\nram_gib 5", r"invalid TOML: .*line 7"),
])
def test_malformed_file_names_field_and_file(tmp_path, old, new, expected):
    assert old in VALID
    path = write(tmp_path, VALID.replace(old, new))
    with pytest.raises(EdgeqError, match=expected) as e:
        load_device(path)
    assert str(path) in str(e.value)
