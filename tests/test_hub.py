"""Models and adapters named by hub id, resolved from a Hugging Face cache laid out on disk (no network)."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import EdgeqError

COMMIT = "a" * 40
OTHER = "b" * 40


def place_in_cache(cache, repo: str, folder, commit: str = COMMIT, ref: str = "main"):
    """`folder`'s files as huggingface_hub's cache holds a repo: models--org--name/snapshots/<commit>/, refs/<ref>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    if folder.is_dir():
        shutil.copytree(folder, snapshot)
    else:
        snapshot.mkdir(parents=True)
        shutil.copy(folder, snapshot / folder.name)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_llama, tiny_lora):
    cache = tmp_path / "hub"
    snapshot = place_in_cache(cache, "org/tiny", tiny_llama)
    (snapshot / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# tiny\n")  # the repo's own card
    place_in_cache(cache, "org/tiny-lora", tiny_lora)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_offline_export_of_a_hub_id_with_a_hub_adapter(hub_cache, tmp_path):
    out = tmp_path / "bundle"
    result = _run("export", "org/tiny", "--adapter", "org/tiny-lora", "--format", "gguf", "--precision", "Q8_0", "-o", out,
                  "--eval-tokens", "64")
    assert result.exit_code == 0, result.output
    source = json.loads((out / "edgeq.json").read_text())["source"]
    assert source["hub"] == {"hub_id": "org/tiny", "revision": COMMIT}
    assert source["adapter"]["hub"] == {"hub_id": "org/tiny-lora", "revision": COMMIT}
    assert source["base_model"] == "org/tiny"
    card = (out / "README.md").read_text()
    assert "base_model: org/tiny\n" in card and "license: mit\n" in card  # the license carried from the source's card


def test_default_bundle_name_is_the_repos_name(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _run("export", "org/tiny", "--format", "gguf", "--precision", "Q8_0", "--eval-tokens", "0")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tiny-generic-q8_0" / "edgeq.json").is_file()


def test_a_local_folder_of_that_name_wins(hub_cache, tmp_path, monkeypatch, tiny_llama):
    from edgeq.intake import open_model

    shutil.copytree(tiny_llama, tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    source = open_model("org/tiny")
    assert source.path.resolve() == tmp_path / "org" / "tiny" and "hub" not in source.origin
    with pytest.raises(EdgeqError, match="local path"):
        open_model("org/tiny", revision="main")


def test_revision_picks_that_snapshot(hub_cache, tiny_llama, tmp_path):
    from edgeq.intake import open_model

    changed = tmp_path / "changed"
    shutil.copytree(tiny_llama, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    place_in_cache(hub_cache, "org/tiny", changed, commit=OTHER, ref="v2")
    assert open_model("org/tiny").config["rms_norm_eps"] == 1e-5
    newer = open_model("org/tiny", revision="v2")
    assert newer.config["rms_norm_eps"] == 1e-3 and newer.origin["hub"]["revision"] == OTHER


def test_missing_model_is_one_line_naming_the_cache_and_the_fetch(hub_cache, tmp_path):
    result = _run("export", "org/absent", "--format", "gguf", "--precision", "Q8_0", "-o", tmp_path / "out")
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(hub_cache) in lines[0] and "hf download org/absent" in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_missing_adapter_is_named_as_an_adapter(hub_cache, tmp_path):
    result = _run("export", "org/tiny", "--adapter", "org/absent-lora", "--format", "gguf", "--precision", "Q8_0", "-o", tmp_path / "o")
    assert result.exit_code == 1 and "adapter org/absent-lora" in result.output, result.output


def test_gguf_repo_takes_a_file_by_its_type(hub_cache, tiny_gguf, tmp_path):
    from edgeq.intake import open_model

    gguf_repo = tmp_path / "gguf-repo"
    gguf_repo.mkdir()
    shutil.copy(tiny_gguf, gguf_repo / "tiny-Q8_0.gguf")
    place_in_cache(hub_cache, "org/tiny-GGUF", gguf_repo)
    source = open_model("org/tiny-GGUF:q8_0")  # types match case-insensitively, as llama.cpp's -hf does
    assert source.origin["hub"] == {"hub_id": "org/tiny-GGUF", "revision": COMMIT, "file": "tiny-Q8_0.gguf"}
    assert source.origin["gguf_file"]["precision"] == "Q8_0"
    with pytest.raises(EdgeqError, match=r"no Q4_K_M GGUF file \(it has Q8_0\)"):
        open_model("org/tiny-GGUF:Q4_K_M")
    with pytest.raises(EdgeqError, match="org/tiny-GGUF:Q8_0"):
        open_model("org/tiny-GGUF")  # no tag and no Q4_K_M: the types it has are named


def test_without_a_network_the_cache_answers_at_once(hub_cache, monkeypatch):
    """HF_HUB_OFFLINE unset but the hub unreachable (here: a closed loopback port): the cache, without half a
    minute of huggingface_hub's retries."""
    import time

    from huggingface_hub import constants

    from edgeq import hub
    from edgeq.intake import open_model

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.hub_unreachable.cache_clear()
    started = time.monotonic()
    try:
        assert open_model("org/tiny").origin["hub"]["revision"] == COMMIT
        with pytest.raises(EdgeqError, match="unreachable"):
            open_model("org/absent")
    finally:
        hub.hub_unreachable.cache_clear()
    assert time.monotonic() - started < 10
