"""Single-function `.mlpackage`s merged into one multifunction package, weights shared by content, streamed.

coremltools' `save_multifunction` loads every function's program with all its weights as numpy arrays, deduplicates
them and serializes the whole program again: several times the package's size in memory, the peak of a 3B
Core ML export (bench/README.md). Merging needs none of that. A package is a protobuf spec whose weights are
references (`blobFileValue`: file, offset) into one weight file; so each function's program is taken over as it
is, and each blob it references is copied into the merged weight file once per distinct content (the functions
of an export hold the same weights, so the second function's blobs point at the first's). Memory: the specs and
the largest single blob. The weight file layout (a 64-byte header holding the blob count, then per blob a 64-byte
metadata record with its data offset, everything on 64-byte boundaries) is MIL's blob storage format, which
coremltools' `libmilstoragepython` reads and writes.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

WEIGHTS = Path("Data") / "com.apple.CoreML" / "weights" / "weight.bin"
WEIGHT_FILE_REF = "@model_path/weights/weight.bin"
ALIGNMENT = 64
SENTINEL = 0xDEADBEEF
_HEADER = struct.Struct("<II56x")          # blob count, format version
_METADATA = struct.Struct("<IIQQQ32x")     # sentinel, data type, size in bytes, data offset, padding in bits


def merge_packages(functions: dict[str, Path], out: Path, default: str) -> None:
    """One package at `out` whose function `name` is the `main` function of the package `functions[name]`."""
    import tempfile

    from coremltools.models.utils import _create_mlpackage, load_spec
    from coremltools.proto import Model_pb2

    specs = {name: load_spec(str(path)) for name, path in functions.items()}
    with tempfile.TemporaryDirectory(prefix="edgeq-coreml-merge-", dir=out.parent) as work:
        weights = Path(work) / "weights"
        weights.mkdir()
        with _BlobCopier(weights / "weight.bin") as copier:
            for name, spec in specs.items():
                program = spec.mlProgram.functions["main"]
                for value in _blob_values(program):
                    value.blobFileValue.offset = copier.copy(functions[name] / WEIGHTS, value.blobFileValue.offset)
                    value.blobFileValue.fileName = WEIGHT_FILE_REF
        merged = Model_pb2.Model()
        merged.CopyFrom(next(iter(specs.values())))
        merged.specificationVersion = max(spec.specificationVersion for spec in specs.values())
        merged.mlProgram.ClearField("functions")
        merged.description.Clear()
        merged.description.metadata.CopyFrom(next(iter(specs.values())).description.metadata)
        for name, spec in specs.items():
            merged.mlProgram.functions[name].CopyFrom(spec.mlProgram.functions["main"])
            described = spec.description
            merged.description.functions.add(name=name, input=described.input, output=described.output, state=described.state,
                                             predictedFeatureName=described.predictedFeatureName,
                                             predictedProbabilitiesName=described.predictedProbabilitiesName)
        merged.description.defaultFunctionName = default
        _create_mlpackage(merged, str(weights), str(out))


def _blob_values(function):
    """Every Value of a function that lives in the weight file (const ops keep theirs as the `val` attribute;
    inputs may bind values inline), nested blocks included."""
    def of_value(value):
        if value.WhichOneof("value") == "blobFileValue":
            yield value

    def of_block(block):
        for op in block.operations:
            for value in op.attributes.values():
                yield from of_value(value)
            for argument in op.inputs.values():
                for binding in argument.arguments:
                    if binding.WhichOneof("binding") == "value":
                        yield from of_value(binding.value)
            for inner in op.blocks:
                yield from of_block(inner)

    for block in function.block_specializations.values():
        yield from of_block(block)


class _BlobCopier:
    """Writes a weight file blob by blob, each distinct (type, padding, bytes) once."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")
        self.file.write(_HEADER.pack(0, 2))
        self.count = 0
        self.written: dict[tuple, int] = {}   # (type, padding, size, sha256) → metadata offset in the merged file
        self.sources: dict[Path, object] = {}

    def copy(self, source: Path, offset: int) -> int:
        """The offset in the merged file of the blob at `offset` in `source` (copied there if it is new)."""
        if source not in self.sources:
            self.sources[source] = open(source, "rb")
        reader = self.sources[source]
        reader.seek(offset)
        sentinel, dtype, size, data_offset, padding = _METADATA.unpack(reader.read(_METADATA.size))
        if sentinel != SENTINEL:
            raise ValueError(f"{source}: no blob at offset {offset}")
        reader.seek(data_offset)
        data = reader.read(size)
        key = (dtype, padding, size, hashlib.sha256(data).digest())
        if key not in self.written:
            metadata_at = _aligned(self.file.tell())
            data_at = _aligned(metadata_at + _METADATA.size)
            self.file.seek(metadata_at)
            self.file.write(_METADATA.pack(SENTINEL, dtype, size, data_at, padding))
            self.file.seek(data_at)
            self.file.write(data)
            self.written[key] = metadata_at
            self.count += 1
        return self.written[key]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.seek(0)
        self.file.write(_HEADER.pack(self.count, 2))
        self.file.close()
        for reader in self.sources.values():
            reader.close()


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT
