"""ARCHITECTURE.md stays true: every module it names imports, and sdk/ keeps to its layer."""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAMED = sorted(set(re.findall(r"`(edgeq(?:\.[a-z_0-9]+)+)", (ROOT / "ARCHITECTURE.md").read_text())))
FORMAT_NAMES = re.compile(r"""["'](gguf|onnx|coreml)["']""")


def _module_of(name: str) -> str:
    """`edgeq.quant.calibration.Calibration` → the longest importable prefix."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        try:
            importlib.import_module(candidate)
            return candidate
        except ModuleNotFoundError:
            continue
    return ""


@pytest.mark.parametrize("name", NAMED)
def test_every_named_module_exists(name):
    module = _module_of(name)
    assert module, f"ARCHITECTURE.md names {name}, which does not exist"
    rest = name[len(module) + 1:]
    if rest:
        obj = importlib.import_module(module)
        for attr in rest.split("."):
            assert hasattr(obj, attr), f"ARCHITECTURE.md names {name}: {module} has no {rest}"
            obj = getattr(obj, attr)


def test_sdk_reaches_converters_and_runtimes_only_through_the_registry():
    for path in sorted((ROOT / "sdk").rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"(from|import) edgeq\.(converters|runtimes)\b", text), f"{path} imports a backend by name"
        if path.name not in ("registry.py", "cli.py", "progress.py"):  # progress.py quiets the onnx *library's* logger
            assert not FORMAT_NAMES.search(text), f"{path} names a format literally; ask the registry"


def test_help_and_devices_import_no_heavy_library():
    heavy = ("torch", "onnx", "onnxruntime", "coremltools", "llama_cpp", "transformers")
    code = ("import sys; from click.testing import CliRunner; from edgeq.cli import main; "
            "assert CliRunner().invoke(main, ['devices']).exit_code == 0; "
            "assert CliRunner().invoke(main, ['--help']).exit_code == 0; "
            f"print([m for m in {heavy!r} if m in sys.modules])")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", loaded
