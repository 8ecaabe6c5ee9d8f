"""A catalogue of hostile input and misuse, each case run as a user would run it.

Every case must fail the same way: exit code ≠ 0, at most 3 lines of output, no traceback, nothing
written at or beside the output path, and every file the user had left exactly as it was. Cases that
need a bundle tamper with a copy of one and re-sign its manifest, so the checksum check does not hide
the check under test. Signal cases kill a real export subprocess at several points.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main

EXPORT = ["--format", "gguf", "--precision", "Q8_0", "--eval-tokens", "0"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _snapshot(root: Path) -> dict:
    """Every path under `root` with its kind and content hash: what 'untouched' and 'nothing left' compare."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            tree[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            tree[rel] = ("dir",)
        else:
            tree[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return tree


def _assert_refused(result, needle: str | None = None) -> None:
    text = result.output
    assert result.exit_code not in (0, None), text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert 1 <= len(lines) <= 3, text
    if needle:
        assert needle.lower() in text.lower(), text


@pytest.fixture(scope="module")
def bundle(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "tiny-q8"
    result = _run("export", tiny_llama, *EXPORT, "-o", out)
    assert result.exit_code == 0, result.output
    return out


class Sandbox:
    """One case's world: a copy of the model, a copy of the bundle, the user's own files; cwd inside it."""

    def __init__(self, root: Path, model: Path, bundle: Path):
        self.root = root
        self.model = root / "model"
        shutil.copytree(model, self.model)
        self._bundle_source = bundle
        self.mine = root / "mine"
        self.mine.mkdir()
        (self.mine / "notes.txt").write_text("my own notes\n")
        self.out = root / "out"

    @property
    def bundle(self) -> Path:
        copy = self.root / "bundle"
        if not copy.exists():
            shutil.copytree(self._bundle_source, copy)
        return copy

    def export(self, *extra, to: Path | str | None = None):
        return ["export", self.model, *EXPORT, "-o", to if to is not None else self.out, *extra]

    def resign(self, **changes) -> None:
        """Applies manifest changes and rewrites its checksums for the files now in the bundle."""
        path = self.bundle / "edgeq.json"
        manifest = json.loads(path.read_text())
        manifest.update(changes)
        manifest["files"] = {p.relative_to(self.bundle).as_posix(): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                                                                     "bytes": p.stat().st_size}
                             for p in sorted(self.bundle.rglob("*")) if p.is_file() and p.name != "edgeq.json"}
        path.write_text(json.dumps(manifest))

    def config(self, **changes) -> None:
        path = self.model / "config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    def header(self, edit) -> None:
        """Rewrites the safetensors header through `edit(header) -> header`, keeping the data bytes."""
        path = self.model / "model.safetensors"
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = edit(json.loads(raw[8:8 + n]))
        text = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])

    def weights(self, edit) -> None:
        """Rewrites the weights through `edit(tensors) -> tensors` (a dict of torch tensors)."""
        from safetensors.torch import load_file, save_file

        path = self.model / "model.safetensors"
        save_file(edit(load_file(path)), path)


def _entry(header, suffix):
    return next(k for k in header if k.endswith(suffix))


def _set(header, suffix, **fields):
    header[_entry(header, suffix)].update(fields)
    return header


def _poison(value):
    def edit(tensors):
        name = "model.layers.1.mlp.up_proj.weight"
        tensors[name] = tensors[name].clone()
        tensors[name][3, 5] = value
        return tensors
    return edit


def _shard(s: Sandbox, drop_second: bool, extra_index_entry: bool = False) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(s.model / "model.safetensors")
    (s.model / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, s.model / shard)
        weight_map.update({n: shard for n in part})
    if extra_index_entry:
        weight_map["model.layers.0.mlp.extra.weight"] = "model-00001-of-00002.safetensors"
    (s.model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if drop_second:
        (s.model / "model-00002-of-00002.safetensors").unlink()


def _adapter(s: Sandbox, config_text: str) -> list:
    from conftest import build_lora

    adapter = build_lora(s.root / "adapter", s.model)
    (adapter / "adapter_config.json").write_text(config_text)
    return s.export("--adapter", adapter)


def _text_file(s: Sandbox, data: bytes) -> Path:
    path = s.root / "text.txt"
    path.write_bytes(data)
    return path


LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
RUN = ("Hi", "--max-new-tokens", "2")
# `edgeq run BUNDLE Hi --OPTION VALUE` with a value the option refuses: the error names the option
RUN_VALUES_REFUSED = [("seed", "-1"), ("temperature", "-1"), ("temperature", "nan"), ("top-p", "nan"), ("top-p", "0"), ("top-p", "1.5"),
                      ("top-k", "-1"), ("repetition-penalty", "0"), ("max-new-tokens", "0"), ("max-new-tokens", "-1"),
                      ("threads", "0"), ("stop", "")]


def _model_outside(s: Sandbox, where: str) -> list:
    shutil.copy(s.bundle / "model.gguf", s.root / "x.gguf")
    s.resign(model_file=str(s.root / "x.gguf") if where == "absolute" else "../x.gguf")
    return ["run", s.bundle, *RUN]


def _unlisted_model(s: Sandbox) -> list:
    shutil.copy(s.bundle / "model.gguf", s.bundle / "other.gguf")
    _edit_json(s.bundle / "edgeq.json", lambda m: m.update(model_file="other.gguf"))
    return ["run", s.bundle, *RUN]


def _symlink_out(s: Sandbox) -> list:
    shutil.move(s.bundle / "model.gguf", s.root / "x.gguf")
    (s.bundle / "model.gguf").symlink_to(s.root / "x.gguf")  # same bytes: the checksum alone would pass it
    return ["run", s.bundle, *RUN]


def _template(s: Sandbox, text: str, listed: bool = True) -> list:
    (s.bundle / "chat_template.jinja").write_text(text)
    if listed:
        s.resign()
    return ["run", s.bundle, *RUN]


def _bundle_file(s: Sandbox, name: str, data: bytes, resign: bool = False) -> Path:
    (s.bundle / name).write_bytes(data)
    if resign:
        s.resign()
    return s.bundle


def _symlinked_output(s: Sandbox) -> list:
    (s.root / "link").symlink_to(s.bundle)
    return s.export("--overwrite", to=s.root / "link")


CASES = {
    # --overwrite and -o: never destroy what edgeq did not make
    "overwrite-user-folder": (lambda s: s.export("--overwrite", to=s.mine), "not an edgeq bundle"),
    "overwrite-model-folder": (lambda s: s.export("--overwrite", to=s.model), "output"),
    "overwrite-folder-holding-model": (lambda s: s.export("--overwrite", to=s.root), "output"),
    "overwrite-user-file": (lambda s: s.export("--overwrite", to=s.mine / "notes.txt"), "not an edgeq bundle"),
    "output-dot": (lambda s: s.export(to="."), "-o"),
    "output-dot-overwrite": (lambda s: s.export("--overwrite", to="."), "-o"),
    "output-dotdot-overwrite": (lambda s: s.export("--overwrite", to=".."), "-o"),
    "output-symlink-overwrite": (_symlinked_output, "symbolic link"),
    "output-parent-missing": (lambda s: s.export(to=s.root / "no" / "such" / "out"), "does not exist"),
    "output-under-a-file": (lambda s: s.export(to=s.mine / "notes.txt" / "out"), "not a folder"),
    # the bundle's manifest is input too
    "manifest-model-outside": (lambda s: _model_outside(s, "relative"), "model_file"),
    "manifest-model-absolute": (lambda s: _model_outside(s, "absolute"), "model_file"),
    "manifest-inspect-outside": (lambda s: s.resign(model_file="../../etc/hostname") or ["inspect", s.bundle], "model_file"),
    "manifest-file-outside": (lambda s: _edit_json(s.bundle / "edgeq.json", lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "bytes": 1}}))
                              or ["inspect", s.bundle], "files"),
    "manifest-unlisted-model": (_unlisted_model, "not among the checksummed"),
    "manifest-symlink-out": (_symlink_out, "outside"),
    "manifest-array": (lambda s: ["inspect", _bundle_file(s, "edgeq.json", b"[]")], "array"),
    "manifest-empty": (lambda s: ["inspect", _bundle_file(s, "edgeq.json", b"")], "JSON"),
    "manifest-not-utf8": (lambda s: ["inspect", _bundle_file(s, "edgeq.json", b"\xff\xfe{garbage")], "JSON"),
    "manifest-deep": (lambda s: ["inspect", _bundle_file(s, "edgeq.json", b"[" * 100000 + b"]" * 100000)], "JSON"),
    "manifest-no-files": (lambda s: _edit_json(s.bundle / "edgeq.json", lambda m: m.pop("files")) or ["run", s.bundle, *RUN], "files"),
    "manifest-bad-type": (lambda s: s.resign(context_length="big") or ["run", s.bundle, *RUN], "context_length"),
    "manifest-newer": (lambda s: s.resign(edgeq_manifest=7) or ["inspect", s.bundle], "upgrade"),
    "manifest-grants-pickle": (lambda s: s.resign(trust_pickle=True) or ["run", s.bundle, *RUN], "trust_pickle"),
    "manifest-unlisted-template": (lambda s: _edit_json(s.bundle / "edgeq.json", lambda m: m["files"].pop("chat_template.jinja"))
                                   or _template(s, LOOP, listed=False), "checksum"),
    "template-endless-loop": (lambda s: _template(s, LOOP), "limit"),
    "template-output-bomb": (lambda s: _template(s, "{% for i in range(100000) %}{{ 'x' * 60000 }}{% endfor %}"), "limit"),
    "template-invalid-jinja": (lambda s: _template(s, "{% for %}"), "Jinja"),
    "bundle-tokenizer-corrupt": (lambda s: ["run", _bundle_file(s, "tokenizer.json", b'{"model": 5}', resign=True), *RUN], "tokenizer"),
    # the checkpoint: config.json
    "config-array": (lambda s: _write(s.model / "config.json", "[1, 2]") or s.export(), "object"),
    "config-not-json": (lambda s: _write(s.model / "config.json", "{") or s.export(), "JSON"),
    "config-no-hidden-size": (lambda s: _edit_json(s.model / "config.json", lambda c: c.pop("hidden_size")) or s.export(), "hidden_size"),
    "config-zero-heads": (lambda s: s.config(num_attention_heads=0) or s.export(), "num_attention_heads"),
    "config-heads-not-multiple": (lambda s: s.config(num_key_value_heads=3) or s.export(), "num_key_value_heads"),
    "config-string-number": (lambda s: s.config(hidden_size="64") or s.export(), "hidden_size"),
    "config-more-layers": (lambda s: s.config(num_hidden_layers=4) or s.export(), "layers"),
    "config-architectures-string": (lambda s: s.config(architectures="LlamaForCausalLM") or s.export(), "architectures"),
    # the checkpoint: safetensors
    "safetensors-not-object": (lambda s: s.header(lambda h: [1, 2]) or s.export(), "not an object"),
    "safetensors-lies-size": (lambda s: s.header(lambda h: _set(h, "layers.0.mlp.up_proj.weight", shape=[256, 64])) or s.export(), "bytes"),
    "safetensors-overlap": (lambda s: s.header(lambda h: _set(h, "layers.0.post_attention_layernorm.weight",
                                                              data_offsets=h[_entry(h, "layers.0.input_layernorm.weight")]["data_offsets"]))
                            or s.export(), "overlaps"),
    "safetensors-bad-dtype": (lambda s: s.header(lambda h: _set(h, "model.norm.weight", dtype="F99")) or s.export(), "dtype"),
    "safetensors-wrong-shape": (lambda s: s.header(lambda h: _set(h, "layers.0.mlp.up_proj.weight", shape=[64, 128])) or s.export(), "shape"),
    "safetensors-missing-tensor": (lambda s: s.weights(lambda t: {k: v for k, v in t.items() if not k.endswith("layers.1.mlp.up_proj.weight")})
                                   or s.export(), "up_proj"),
    "safetensors-tiny-file": (lambda s: _write(s.model / "model.safetensors", b"abc") or s.export(), "safetensors"),
    "safetensors-huge-header": (lambda s: _write(s.model / "model.safetensors", struct.pack("<Q", 1 << 60) + b"{}") or s.export(),
                                "safetensors"),
    "weights-nan": (lambda s: s.weights(_poison(math.nan)) or s.export(), "layers.1.mlp.up_proj.weight"),
    "weights-inf": (lambda s: s.weights(_poison(math.inf)) or s.export(), "layers.1.mlp.up_proj.weight"),
    "weights-integer": (lambda s: s.weights(lambda t: {**t, "model.norm.weight": t["model.norm.weight"].to(__import__("torch").int32)})
                        or s.export(), "model.norm.weight"),
    "shard-missing": (lambda s: _shard(s, drop_second=True) or s.export(), "model-00002-of-00002.safetensors"),
    "shard-index-names-missing-tensor": (lambda s: _shard(s, drop_second=False, extra_index_entry=True) or s.export(), "mlp.extra.weight"),
    # the checkpoint: tokenizer files
    "tokenizer-empty": (lambda s: _write(s.model / "tokenizer.json", "") or s.export(), "tokenizer.json"),
    "tokenizer-corrupt": (lambda s: _write(s.model / "tokenizer.json", '{"version": "1.0", "model": []}') or s.export(), "tokenizer.json"),
    "tokenizer-config-not-json": (lambda s: _write(s.model / "tokenizer_config.json", "{'a':") or s.export(), "tokenizer_config.json"),
    "tokenizer-config-array": (lambda s: _write(s.model / "tokenizer_config.json", "[]") or s.export(), "tokenizer_config.json"),
    "template-not-jinja": (lambda s: _edit_json(s.model / "tokenizer_config.json", lambda c: c.update(chat_template="{% if %}")) or s.export(),
                           "Jinja"),
    "template-not-string": (lambda s: _edit_json(s.model / "tokenizer_config.json", lambda c: c.update(chat_template=5)) or s.export(),
                            "chat_template"),
    # the adapter
    "adapter-config-not-json": (lambda s: _adapter(s, "not json"), "adapter_config.json"),
    "adapter-rank-null": (lambda s: _adapter(s, json.dumps({"peft_type": "LORA", "r": None, "lora_alpha": 4})), "adapter_config.json"),
    "adapter-rank-zero": (lambda s: _adapter(s, json.dumps({"peft_type": "LORA", "r": 0, "lora_alpha": 4})), "adapter_config.json"),
    # text files
    "calibration-binary": (lambda s: s.export("--calibration", _text_file(s, b"\x00\x01\x02binary" * 50)), "binary"),
    "calibration-latin1": (lambda s: s.export("--calibration", _text_file(s, "caf\xe9 cr\xe8me ".encode("latin-1") * 50)), "UTF-8"),
    "calibration-empty": (lambda s: s.export("--calibration", _text_file(s, b" \n\n")), "empty"),
    "eval-text-binary": (lambda s: ["eval", s.bundle, "--text", _text_file(s, b"\x89PNG\r\n\x1a\n\x00\x00")], "binary"),
    # numbers of every command
    "export-bits-99": (lambda s: s.export("--bits-per-weight", "99"), "bits-per-weight"),
    "export-bits-nan": (lambda s: s.export("--bits-per-weight", "nan"), "bits-per-weight"),
    "export-bits-zero": (lambda s: s.export("--bits-per-weight", "0"), "bits-per-weight"),
    "export-size-dots": (lambda s: s.export("--size", "1.2.3MB"), "size"),
    "export-size-negative": (lambda s: s.export("--size", "-5MB"), "size"),
    "export-size-zero": (lambda s: s.export("--size", "0"), "size"),
    "export-eval-tokens-negative": (lambda s: s.export("--eval-tokens", "-1"), "eval-tokens"),
    "export-calibration-tokens-zero": (lambda s: s.export("--calibration-tokens", "0"), "calibration-tokens"),
    "export-block-size-zero": (lambda s: s.export("--block-size", "0"), "block-size"),
    "plan-size-dots": (lambda s: ["plan", s.model, "--size", "1.2.3MB"], "size"),
    "plan-bits-inf": (lambda s: ["plan", s.model, "--bits-per-weight", "inf"], "bits-per-weight"),
    "run-empty-prompt": (lambda s: ["run", s.bundle, ""], "PROMPT"),
    **{f"run-{option}={value}": (lambda s, option=option, value=value: ["run", s.bundle, "Hi", f"--{option}", value], option)
       for option, value in RUN_VALUES_REFUSED},
    "eval-ctx-zero": (lambda s: ["eval", s.bundle, "--ctx", "0"], "ctx"),
    "eval-tokens-zero": (lambda s: ["eval", s.bundle, "--tokens", "0"], "tokens"),
    "eval-threads-zero": (lambda s: ["eval", s.bundle, "--threads", "0"], "threads"),
    "profile-prompt-tokens-zero": (lambda s: ["profile", s.bundle, "--prompt-tokens", "0,64"], "prompt-tokens"),
    "profile-prompt-tokens-words": (lambda s: ["profile", s.bundle, "--prompt-tokens", "a,b"], "prompt-tokens"),
    "profile-gen-zero": (lambda s: ["profile", s.bundle, "--gen", "0"], "gen"),
    "profile-repeat-zero": (lambda s: ["profile", s.bundle, "--repeat", "0"], "repeat"),
    "unknown-command": (lambda s: ["exprot", s.model], "exprot"),
    "unknown-top-level-option": (lambda s: ["--bogus", "inspect", s.bundle], "bogus"),
}


def _write(path: Path, data: str | bytes) -> None:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_refused_in_one_line_touching_nothing(case, tiny_llama, bundle, tmp_path, monkeypatch):
    sandbox = Sandbox(tmp_path, tiny_llama, bundle)
    setup, needle = CASES[case]
    args = setup(sandbox)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    started = time.perf_counter()
    _assert_refused(_run(*args), needle)
    assert time.perf_counter() - started < 30
    assert _snapshot(tmp_path) == before  # nothing written at or beside the output, the user's files as they were


def test_output_inside_the_model_folder_refused(tiny_llama, tmp_path):
    """The export pipeline passes its inputs; the bundle may not land in (or over) any of them."""
    from edgeq import EdgeqError
    from edgeq.bundle import check_writable

    with pytest.raises(EdgeqError, match="inside the input folder"):
        check_writable(tiny_llama / "bundle", inputs=[tiny_llama, None])
    with pytest.raises(EdgeqError, match="holds the input"):
        check_writable(tiny_llama.parent, overwrite=True, inputs=[tiny_llama])


def test_overwrite_replaces_a_bundle_atomically_and_keeps_it_on_failure(tiny_llama, tmp_path):
    out = tmp_path / "out"
    assert _run("export", tiny_llama, *EXPORT, "-o", out).exit_code == 0
    first = _snapshot(out)
    assert _run("export", tiny_llama, *EXPORT, "-o", out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old-*, no .partial-*
    second = _snapshot(out)
    broken = Sandbox(tmp_path / "broken", tiny_llama, out)
    broken.weights(_poison(math.nan))  # fails inside the conversion, after staging began
    result = _run("export", broken.model, *EXPORT, "-o", out, "--overwrite")
    _assert_refused(result, "NaN")
    assert _snapshot(out) == second and {k for k in first} == {k for k in second}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]


def test_bundle_is_readable_by_the_group(bundle):
    mask = os.umask(0)
    os.umask(mask)
    for path in [bundle, *bundle.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert path.stat().st_mode & 0o777 == want, path


def test_generate_refuses_misuse_in_one_line(bundle):
    import edgeq
    from edgeq import EdgeqError

    calls = [dict(messages="hello"), dict(messages=[{"role": "user"}]), dict(messages=[{"role": 1, "content": "x"}]),
             dict(messages=[]), dict(messages={"role": "user", "content": "x"}), dict(prompt=""), dict(),
             dict(prompt="Hi", messages=[{"role": "user", "content": "x"}]), dict(prompt="Hi", max_new_tokens=-1),
             dict(prompt="Hi", max_new_tokens=0), dict(prompt="Hi", max_new_tokens=2.5), dict(prompt="Hi", max_new_tokens=True),
             dict(prompt="Hi", stop=[""]), dict(prompt="Hi", stop=5), dict(prompt="Hi", temperature=-1),
             dict(prompt="Hi", temperature=float("inf")), dict(prompt="Hi", top_p=float("nan")), dict(prompt="Hi", top_p=0),
             dict(prompt="Hi", top_k=-3), dict(prompt="Hi", repetition_penalty=0), dict(prompt="Hi", seed=-1),
             dict(prompt="Hi", seed="7")]
    with edgeq.load(bundle) as model:
        for kwargs in calls:
            with pytest.raises(EdgeqError) as info:
                model.generate(**kwargs)
            assert "\n" not in str(info.value), kwargs
        assert model.generate("Hi", max_new_tokens=2, seed=0, temperature=0.7, top_p=0.9) is not None


# ---- signals and kills during a real export ------------------------------------------------------------

def _export_process(model: Path, out: Path, eval_tokens: int = 64) -> subprocess.Popen:
    code = "import sys; from edgeq.cli import main; sys.argv = ['edgeq'] + sys.argv[1:]; main()"
    return subprocess.Popen([sys.executable, "-c", code, "export", str(model), *EXPORT[:-1], str(eval_tokens), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _stage(folder: Path, pid: int) -> Path | None:
    return next((p for p in folder.iterdir() if f".partial-{pid}-" in p.name), None)


def _has_files(stage: Path | None) -> bool:
    try:
        return stage is not None and any(stage.iterdir())
    except FileNotFoundError:  # the export removed it since it was found: its output says why
        return False


POINTS = {  # where an export is killed: mid-conversion, and with the model file written (llama.cpp loads it for eval next)
    "converting": _has_files,
    "model-written": lambda stage: stage is not None and (stage / "model.gguf").is_file(),
}


def _kill_at(process: subprocess.Popen, folder: Path, point: str, sig: int, timeout: float = 300) -> str:
    end = time.monotonic() + timeout
    while not POINTS[point](_stage(folder, process.pid)):
        assert process.poll() is None, f"export ended before the point to kill it at: {process.stdout.read()}"
        assert time.monotonic() < end, "the export never reached the point to kill it at"
        time.sleep(0.005)
    process.send_signal(sig)
    return process.communicate(timeout=120)[0]


@pytest.mark.parametrize("point", list(POINTS))
def test_sigterm_cleans_up_like_ctrl_c(point, tiny_llama, tmp_path):
    process = _export_process(tiny_llama, tmp_path / "out")
    output = _kill_at(process, tmp_path, point, signal.SIGTERM)
    assert process.returncode == 130 and "interrupted" in output, output
    assert "Traceback" not in output and len(output.strip().splitlines()) <= 3, output
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leftovers_go_with_the_next_export(tiny_llama, tmp_path):
    """Killed mid-conversion, then the next export killed after writing its model: each export removes the
    dead ones' stages as it starts, and the one that completes leaves only its bundle."""
    out = tmp_path / "out"
    first = _export_process(tiny_llama, out)
    _kill_at(first, tmp_path, "converting", signal.SIGKILL)
    dead = _stage(tmp_path, first.pid)
    assert first.returncode == -signal.SIGKILL and dead is not None
    second = _export_process(tiny_llama, out)
    _kill_at(second, tmp_path, "model-written", signal.SIGKILL)  # its stage is the only one: it swept the first
    assert not dead.exists() and len([p for p in tmp_path.iterdir()]) == 1
    third = _export_process(tiny_llama, out, eval_tokens=0)
    output = third.communicate(timeout=300)[0]
    assert third.returncode == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_full_disk_is_reported_as_a_full_disk(tiny_llama, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this container may not mount a tmpfs")
    try:
        result = _run("export", tiny_llama, *EXPORT, "-o", disk / "out")
        _assert_refused(result, "full")
        assert "bytes" in result.output and list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: the failed writer may still hold its file
