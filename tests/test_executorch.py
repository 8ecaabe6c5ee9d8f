"""The ExecuTorch format's own behaviour beyond the shared checker (tests/test_backends.py): its pins, what the
written program says about itself, its quantized precisions, and refusals."""
from __future__ import annotations

from importlib import metadata

import pytest

from edgeq.converters.executorch import spec as et_spec
from edgeq.errors import EdgeqError


def test_the_installed_versions_are_the_pinned_ones():
    et_spec.check_installed()  # the test environment installs edgeq[executorch]
    assert {name: metadata.version(name).split("+")[0] for name in et_spec.PINS} == et_spec.PINS


def test_a_torch_executorch_mismatch_is_one_line_naming_both_and_the_extra(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(et_spec.metadata, "version", lambda name: "2.11.0" if name == "torch" else real(name))
    with pytest.raises(EdgeqError) as refused:
        et_spec.EXECUTORCH.converter()
    message = str(refused.value)
    assert "\n" not in message
    assert "torch 2.11.0" in message and "executorch 1.5.1" in message and "torch==2.13.0" in message
    assert "edgeq[executorch]" in message


def test_a_missing_executorch_names_the_extra(monkeypatch):
    real = metadata.version

    def version(name):
        if name == "executorch":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(et_spec.metadata, "version", version)
    with pytest.raises(EdgeqError, match=r"needs executorch.*pip install 'edgeq\[executorch\]'"):
        et_spec.check_installed()
