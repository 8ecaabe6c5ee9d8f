"""Property tests of the readers that take hostile input: whatever they are given, they answer or raise EdgeqError.

A reader that lets a KeyError, a ZeroDivisionError or an OverflowError out turns a bad file into a
traceback; worse, one that accepts what it should refuse (a manifest path that leaves the bundle, header
ranges that overlap) turns it into a wrong answer. Each test also checks what an accepted input promises.
"""
from __future__ import annotations

import copy
import json
import math
import struct
import tempfile
from pathlib import Path, PurePosixPath

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeq import EdgeqError
from edgeq.devices import DeviceProfile, _parse
from edgeq.manifest import check_manifest
from edgeq.safetensors_index import DTYPE_BYTES, parse_header
from edgeq.validate import check_generate_args, check_messages, parse_size

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=16)
path_like = st.text(alphabet="ab./\\:~\x00 ", max_size=10) | st.sampled_from(
    ["../x", "/etc/passwd", "a/../b", "./m.gguf", "a//b", "C:\\x", "model.gguf", "tokenizer.json", "sub/file", "..", "."])

SHA = "0" * 64
VALID_MANIFEST = {
    "edgeq_manifest": 1, "edgeq_version": "0.1.0", "created": "2025-01-01T00:00:00+00:00", "format": "gguf",
    "runtime": "llamacpp", "model_file": "model.gguf", "precision": "Q8_0", "context_length": 256,
    "files": {"model.gguf": {"sha256": SHA, "bytes": 10}, "tokenizer.json": {"sha256": SHA, "bytes": 5}},
    "tokenizer": {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "stop_token_ids": [2]},
    "source": {"path": "/m", "architecture": "LlamaForCausalLM", "sha256": SHA},
    "device": {"id": "pixel-8", "threads": 4},
    "quality": {"kl": 0.01, "top1": 0.9, "ppl": 10.0, "ppl_ref": 9.9, "tokens": 128, "ctx": 64},
    "mismatches": [{"tensor": "t", "asked": "Q4_K", "got": "Q5_0", "why": "row width"}],
    "tensors": {"t": {"type": "Q8_0", "shape": [2, 2], "bytes": 4}},
}


@st.composite
def manifests(draw):
    """A valid manifest with a few of its fields (or file names) replaced by arbitrary JSON or path-like text."""
    data = copy.deepcopy(VALID_MANIFEST)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["top", "nested", "file-key", "model-file", "drop"]))
        key = draw(st.sampled_from(sorted(data)))
        if kind == "top":
            data[key] = draw(json_values)
        elif kind == "nested" and isinstance(data.get(key), dict) and data[key]:
            data[key][draw(st.sampled_from(sorted(data[key])))] = draw(json_values)
        elif kind == "file-key" and isinstance(data.get("files"), dict):
            data["files"][draw(path_like)] = {"sha256": SHA, "bytes": 1}
        elif kind == "model-file":
            data["model_file"] = draw(path_like)
        elif kind == "drop":
            data.pop(key)
    return data


def _inside(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and ".." not in parts and "\\" not in name


@SETTINGS
@given(manifests() | json_values)
def test_manifest_reader(data):
    try:
        accepted = check_manifest(data, "edgeq.json")
    except EdgeqError:
        return
    assert _inside(accepted["model_file"]) and all(_inside(name) for name in accepted["files"])


@SETTINGS
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_manifest_file_reader(raw):
    """The whole read path, file bytes included (not JSON, not UTF-8, nested too deep)."""
    from edgeq.bundle import read_manifest

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "edgeq.json").write_bytes(raw)
        try:
            read_manifest(folder)
        except EdgeqError:
            pass


entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(sorted(DTYPE_BYTES)) | st.text(max_size=4) | scalars,
    "shape": st.lists(st.integers(-2, 6), max_size=3) | scalars,
    "data_offsets": st.lists(st.integers(-4, 300), min_size=2, max_size=2) | scalars,
}) | json_values


@SETTINGS
@given(st.dictionaries(st.text(max_size=6), entries, max_size=5) | json_values, st.integers(0, 400))
def test_safetensors_header_reader(header, data_bytes):
    raw = json.dumps(header).encode()
    try:
        infos = parse_header(Path("w.safetensors"), raw, 8 + len(raw) + data_bytes)
    except EdgeqError:
        return
    # accepted: every tensor's bytes are exactly its shape's, and together they tile the data section
    total = sum(math.prod(i.shape) * DTYPE_BYTES[i.dtype] for i in infos.values())
    assert total == data_bytes


@SETTINGS
@given(st.binary(max_size=64))
def test_safetensors_file_reader(raw):
    from edgeq.safetensors_index import read_header

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "w.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw if raw[:1] == b"{" else raw)
        try:
            read_header(path)
        except EdgeqError:
            pass


PROFILE = (Path(__file__).parents[1] / "devices" / "pixel-8.toml").read_text()
toml_values = st.sampled_from(['"x"', "0", "-1", "1e400", "nan", "inf", "true", "[]", '["gguf"]', '["onnx", "onnx"]',
                               "{}", "1" + "0" * 400, "2.5", '"Q4_0"', "[1, 2]"])


@st.composite
def profiles(draw):
    """The Pixel 8 profile with some values replaced, some lines dropped, or random text."""
    lines = [line for line in PROFILE.splitlines() if not line.lstrip().startswith("#") and "#" not in line.split("=")[0]]
    lines = [line.split("#")[0].rstrip() for line in lines]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        if "=" in lines[i] and draw(st.booleans()):
            lines[i] = lines[i].split("=")[0] + "= " + draw(toml_values)
        else:
            lines.pop(i)
    return "\n".join(lines)


@SETTINGS
@given(profiles() | st.text(max_size=80))
def test_device_profile_parser(text):
    try:
        profile = _parse(text, "fuzz", "fuzz.toml")
    except EdgeqError:
        return
    assert isinstance(profile, DeviceProfile) and 0 < profile.budget_gib <= profile.ram_gib


@SETTINGS
@given(st.text(alphabet="0123456789.,-+ eEkKmMgGtTiIbBnNaAfx", max_size=12) | scalars | json_values)
def test_size_parser(size):
    try:
        parsed = parse_size(size)
    except EdgeqError:
        return
    assert isinstance(parsed, int) and parsed >= 1


messages = st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]), scalars | json_values, max_size=3), max_size=3)


@SETTINGS
@given(messages | json_values | st.builds(object))
def test_chat_message_validator(value):
    try:
        check_messages(value)
    except EdgeqError:
        return
    assert value and all(isinstance(m["role"], str) and m["role"] and isinstance(m["content"], str) for m in value)


@SETTINGS
@given(scalars | st.text(max_size=3), messages | st.none(), scalars, scalars | st.lists(st.text(max_size=2), max_size=2))
def test_generate_arguments(prompt, chat, max_new_tokens, stop):
    try:
        check_generate_args(prompt, chat, max_new_tokens, stop)
    except EdgeqError:
        return
    assert isinstance(max_new_tokens, int) and max_new_tokens >= 1 and (prompt is None) != (chat is None)
