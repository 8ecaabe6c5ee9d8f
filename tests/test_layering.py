"""The house keeps its plan: engines read only what their format shares, no module reaches into another's
private names, every extra an error names exists, and a regular install holds every module."""
from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
CODE = [p for top in ("sdk", "converters", "runtimes", "devices") for p in sorted((ROOT / top).rglob("*.py"))]
MAX_LINES = 450


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = {"sdk": "edgeq"}.get(parts[0], f"edgeq.{parts[0]}")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path):
    """(module imported from, names) of every `from X import ...` in the file, relative imports resolved."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def test_engines_import_only_what_their_format_shares():
    for path in sorted((ROOT / "runtimes").glob("*.py")):
        for module, names in _imports(path):
            if not module.startswith("edgeq.converters."):
                continue
            fmt, _, rest = module.removeprefix("edgeq.converters.").partition(".")
            shared = importlib.import_module(f"edgeq.converters.{fmt}").SHARED_WITH_ENGINES
            assert rest in shared, f"{path.name} imports {module}; engines may import only {fmt}'s {shared}"
            assert not any(n.startswith("_") for n in names), f"{path.name} imports private {names} from {module}"


def test_no_module_imports_another_modules_private_names():
    for path in CODE:
        for module, names in _imports(path):
            if module.startswith("edgeq") and module != _module_name(path):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {module}"


def test_no_module_is_over_the_length_bar():
    long = {str(p.relative_to(ROOT)): n for p in CODE if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_extra_named_exists():
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    texts = [p.read_text() for p in CODE] + [(ROOT / name).read_text() for name in ("README.md", "ARCHITECTURE.md")]
    named = {extra for text in texts for group in re.findall(r"edgeq\[([a-z0-9_,-]+)\]", text) for extra in group.split(",")}
    assert named and named <= extras, f"extras named but not in pyproject: {sorted(named - extras)}"


def test_missing_package_names_its_extra():
    from edgeq.registry import extra_for

    for module, extra in (("onnxruntime", "onnx"), ("coremltools", "coreml"), ("llguidance", "structured"), ("fastapi", "serve")):
        assert extra_for(module) == extra
    assert extra_for("no_such_module") is None


def test_every_package_folder_is_listed_in_pyproject():
    dirs = SETUPTOOLS["package-dir"]
    listed = set(SETUPTOOLS["packages"])
    for init in sorted(p for top in ("sdk", "converters", "runtimes", "devices") for p in (ROOT / top).rglob("__init__.py")):
        name = _module_name(init)
        assert name in listed, f"{init.parent.relative_to(ROOT)} is a package ({name}) missing from pyproject's packages"
    for name in listed:  # and each listed package maps to a folder that exists
        parent = next(p for p in sorted(dirs, key=len, reverse=True) if name == p or name.startswith(p + "."))
        folder = ROOT / dirs[parent] / name[len(parent):].lstrip(".").replace(".", "/")
        assert (folder / "__init__.py").is_file(), f"pyproject lists {name}, but {folder} is no package"


def test_a_wheel_holds_every_module(tmp_path):
    """Built from a copy of the tree: a build writes its egg-info beside the sources, which would shadow the
    installed metadata (entry points) of anything run from the checkout."""
    import shutil

    tree = tmp_path / "tree"
    for name in ("pyproject.toml", "README.md", "sdk", "converters", "runtimes", "devices"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy(source, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(tree)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("edgeq-*.whl"))
    held = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    for path in CODE:
        expected = _module_name(path).replace(".", "/") + ("/__init__.py" if path.name == "__init__.py" else ".py")
        assert expected in held, f"the wheel lacks {expected}"
    assert any(n.startswith("edgeq/devices/") and n.endswith(".toml") for n in zipfile.ZipFile(wheel).namelist())


@pytest.mark.parametrize("path", CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_imports(path):
    importlib.import_module(_module_name(path))  # the test extra installs every backend
