"""The bundle: a folder with the model file(s), tokenizer, chat template and a versioned manifest.

A bundle is assembled in a hidden sibling folder named after its owner's pid and swapped into place
only when complete, so a failed or interrupted export (Ctrl-C, SIGTERM) leaves neither a bundle nor
stray files, and what a killed one leaves (SIGKILL, power loss) the next export in that folder removes.
`--overwrite` replaces only a bundle edgeq made, never the user's own folder or the model being exported.
Reading a bundle trusts nothing in it: the manifest is checked against its schema (manifest.py) and
every file a runtime opens against its checksum.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from . import __version__
from .errors import EdgeqError
from .hashing import sha256_file
from .interrupts import interrupt_seen, terminate_as_interrupt
from .manifest import MANIFEST_VERSION, check_manifest
from .validate import read_json_object

MANIFEST = "edgeq.json"
TEMPLATE_FILE = "chat_template.jinja"  # opened by the tokenizer when the bundle has one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SIDE_FILES = (*TOKENIZER_FILES, TEMPLATE_FILE)  # every format's bundle holds these beside its model files
CARD = "README.md"  # the model card (edgeq.model_card): made from the manifest after it, opened by nothing, editable before upload
CARD_BYTES = 4 << 10  # room a --size plan leaves for the card (2-3 KiB), written as the bundle lands
MAX_MANIFEST_BYTES = 64 << 20  # a real manifest is a few hundred KiB even with a plan for every tensor
_STAGE = re.compile(r"\..+\.partial-(?P<pid>\d+)-[a-z0-9_]+")


def _file_table(folder: Path) -> dict:
    table = {}
    derived = {folder / MANIFEST, folder / CARD}  # both describe the files; neither is checksummed with them
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p not in derived):
        table[path.relative_to(folder).as_posix()] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


# ---- writing: where a bundle may land, staging, landing ------------------------------------------------

def _new_stage(out: Path) -> Path:
    """A hidden sibling of `out` that names its owner, so a later export can tell a dead one's leftovers."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))


def remove_stale_stages(folder: Path) -> None:
    """Removes staging folders in `folder` whose edgeq process is gone (killed before it could clean up)."""
    import psutil

    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for entry in entries:
        m = _STAGE.fullmatch(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not psutil.pid_exists(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


def check_writable(out: Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> None:
    """Fails before any work if the bundle could not, or must not, be written at `out`.

    `inputs` are what the export reads (model folder, adapter, calibration text): the output may not be
    one of them, hold one, or lie inside one of the folders.
    """
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise EdgeqError(f"output {str(out) or '.'!r} names no new folder; pass -o NEW_FOLDER")
    real = out.resolve()
    here = Path.cwd().resolve()
    if real == here or real in here.parents:
        raise EdgeqError(f"output {out} is the current folder or holds it; choose another -o")
    for given in filter(None, inputs):
        source = Path(given).resolve()
        if real == source or real in source.parents:
            raise EdgeqError(f"output {out} is or holds the input {given}, which the bundle would replace; choose another -o")
        if source.is_dir() and source in real.parents:
            raise EdgeqError(f"output {out} is inside the input folder {given}; write the bundle elsewhere (-o)")
    if out.is_symlink():
        raise EdgeqError(f"output {out} is a symbolic link; pass the folder it points to, or another -o")
    if out.exists():
        if not overwrite:
            raise EdgeqError(f"output {out} already exists; choose another -o or pass --overwrite")
        if not (out.is_dir() and (out / MANIFEST).is_file()):
            raise EdgeqError(f"output {out} is not an edgeq bundle (no {MANIFEST}); --overwrite replaces only a bundle "
                             "edgeq made: choose another -o or remove it yourself")
    parent = out.parent
    if not parent.exists():
        raise EdgeqError(f"output folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise EdgeqError(f"output folder {parent} is not a folder; choose another -o")
    remove_stale_stages(parent)
    try:  # os.access says yes to root on read-only mounts; only a real write tells
        _new_stage(out).rmdir()  # pid-tagged like a stage: a kill right here leaves nothing the next export keeps
    except OSError as exc:
        raise EdgeqError(f"output folder {parent} is not writable ({exc.strerror}); choose another -o") from exc


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # the portable way reads it by setting it (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


def _publish_modes(stage: Path) -> None:
    """Modes any file the user writes would get (umask), not mkdtemp's owner-only 0700: a bundle is shared."""
    mask = _umask()
    for root, dirs, files in os.walk(stage):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, (0o777 if os.stat(path).st_mode & 0o100 else 0o666) & ~mask)
    os.chmod(stage, 0o777 & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux renameat2, macOS renamex_np); False where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        result = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        result = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # a filesystem without the swap
        return False
    raise OSError(code, os.strerror(code), str(b))


def land(stage: Path, out: Path) -> None:
    """`stage` becomes `out`. An old bundle is swapped out atomically and its files leave under the stage's
    pid-tagged name, so neither a failure nor a kill ever leaves a `.old-*` folder or no bundle at all."""
    if not out.exists():
        stage.rename(out)
        return
    if not (out / MANIFEST).is_file():
        raise EdgeqError(f"output {out} stopped being an edgeq bundle during the export; nothing was replaced")
    if not _exchange(stage, out):
        old = out.with_name(f".{out.name}.partial-{os.getpid()}-old")
        out.rename(old)
        try:
            stage.rename(out)
        except BaseException:
            old.rename(out)
            raise
        stage = old
    shutil.rmtree(stage, ignore_errors=True)


def _disk_full(exc: BaseException | None) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB ({n:,} bytes)"


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


LOW_SPACE = 16 << 20  # free bytes below which a failed export is taken for a full disk (a helper process's
                      # ENOSPC reaches edgeq only as its exit status)


def _full_disk_error(parent: Path, free: int, written: int, needed: int | None) -> EdgeqError:
    need = f"about {_size(needed)}" if needed else f"more than the {_size(written)} it had written"
    return EdgeqError(f"the disk holding {parent.resolve()} is full ({_size(free)} free): the bundle needs {need}; "
                      "free some space or choose another -o")


@contextmanager
def staged_bundle(out: Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                  needed_bytes: int | None = None) -> Iterator[Path]:
    """Yields an empty staging folder; on success it becomes `out` at once, on any failure it vanishes.

    `needed_bytes` (an estimate of the bundle's size) makes a disk without that much room fail before
    any work, and a full disk later name how much was needed.
    """
    out = Path(out)
    check_writable(out, overwrite, inputs)
    if needed_bytes and (free := shutil.disk_usage(out.parent).free) < needed_bytes:
        raise _full_disk_error(out.parent, free, 0, needed_bytes)
    stage = None
    with terminate_as_interrupt():
        try:
            stage = _new_stage(out)
            yield stage
            if not (stage / MANIFEST).is_file():
                raise EdgeqError("internal: bundle staged without a manifest")
            _publish_modes(stage)
            land(stage, out)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                interrupt_seen()  # a second Ctrl-C or SIGTERM must not cut the cleanup short
            free = shutil.disk_usage(out.parent).free  # before the stage's bytes are given back
            full = not isinstance(exc, KeyboardInterrupt) and (_disk_full(exc) or free < LOW_SPACE)
            written = _tree_bytes(stage) if stage and full and stage.is_dir() else 0
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            if full:
                raise _full_disk_error(out.parent, free, written, needed_bytes) from exc
            raise


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Adds version, time and checksums of every file, then writes `edgeq.json`."""
    full = {
        "edgeq_manifest": MANIFEST_VERSION,
        "edgeq_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **manifest,
        "files": _file_table(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
    return full


def copy_tokenizer(source, stage: Path) -> None:
    """The source's tokenizer files and its chat template (what every engine's `generate()` reads) into `stage`."""
    for name in TOKENIZER_FILES:
        for folder in (source.tokenizer_folder, source.path):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, stage / name)
                break
    template = source.chat_template()
    if template:
        (stage / TEMPLATE_FILE).write_text(template)


# ---- reading: the trust boundary -----------------------------------------------------------------------

def read_manifest(folder: Path, verify: bool = True) -> dict:
    """The bundle's manifest, checked against its schema; with `verify`, every file against its checksum."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise EdgeqError(f"{folder} is not an edgeq bundle (no {MANIFEST}); export one with `edgeq export`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise EdgeqError(f"{path} is {_size(path.stat().st_size)}, far more than a manifest; re-export the bundle")
    manifest = check_manifest(read_json_object(path, "re-export the bundle"), str(path))
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    """Every listed file is inside the bundle and matches its checksum, and nothing a runtime opens is unlisted."""
    folder = Path(folder)
    root = folder.resolve()
    files = manifest["files"]
    for name, entry in files.items():
        path = folder / name
        if root not in path.resolve().parents:
            raise EdgeqError(f"bundle file {name} leads outside {folder} (a symbolic link?); re-export the bundle")
        if not path.is_file():
            raise EdgeqError(f"bundle file {name} is missing from {folder}; re-export the bundle")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise EdgeqError(f"bundle file {name} does not match its checksum in {MANIFEST} (changed or corrupt); re-export the bundle")
    model = folder / manifest["model_file"]
    opened = [p for p in model.rglob("*") if p.is_file()] if model.is_dir() else []
    if (folder / TEMPLATE_FILE).exists():
        opened.append(folder / TEMPLATE_FILE)
    for path in opened:
        if path.relative_to(folder).as_posix() not in files:
            raise EdgeqError(f"bundle file {path.relative_to(folder).as_posix()} is not among the checksummed files in "
                             f"{MANIFEST} (added after export?); re-export the bundle")
