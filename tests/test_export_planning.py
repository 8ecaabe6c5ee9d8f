"""A planned export's --size is checked against the bundle as it lands: the manifest counts at its written size."""
from __future__ import annotations

from edgeq.bundle import MANIFEST, write_manifest
from edgeq.export_planning import manifest_bytes


def test_the_size_check_counts_the_manifest_as_it_is_written(tmp_path):
    # a manifest that reads back every tensor, as ExecuTorch's does (74 KB on SmolLM2-135M): once counted as 4 KiB, a
    # planned bundle landed 57 KB over --size
    manifest = {"format": "executorch", "tensors": {f"model.layers.{i}.mlp.down_proj.weight": {
        "type": "8da4w", "shape": [576, 1536], "bytes": 460_800} for i in range(300)}}
    for name in ("model.pte", "tokenizer.json", "etrecord.bin"):
        (tmp_path / name).write_bytes(b"\0" * 1000)
    estimate = manifest_bytes(manifest)
    write_manifest(tmp_path, manifest)  # adds the version, the time and every file's checksum
    written = (tmp_path / MANIFEST).stat().st_size
    assert written > 4096 * 4
    assert written <= estimate <= written + 8192
