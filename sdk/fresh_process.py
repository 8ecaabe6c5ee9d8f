"""Run one function in a new interpreter and get its result back.

Used where a step's memory must not add to this process's (the float GGUF writer holds torch's libraries,
which never give back their resident memory, before llama.cpp's quantizer needs its own peak) or must be
its own high-water mark (profiling). A plain subprocess rather than multiprocessing's spawn, which re-runs
the caller's script as `__mp_main__` and so breaks (or runs twice) a script without a main guard. The
child's own progress bars show; its failures come back as one line, never its traceback.
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import EdgeqError

FAILED = 3  # the child's exit status when it wrote its one-line error into the job file

_CHILD = """
import errno, importlib, os, pickle, sys
from edgeq.errors import EdgeqError
if os.environ.get("EDGEQ_QUIET_LIBRARIES"):  # the parent runs without -v: the libraries' warnings stay quiet here too
    from edgeq.progress import quiet_libraries
    quiet_libraries()
with open(sys.argv[1], "rb") as f:
    module, name, args, doing, disk_hint = pickle.load(f)
try:
    result = getattr(importlib.import_module(module), name)(*args)
except Exception as exc:
    if isinstance(exc, EdgeqError):
        message = str(exc)
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        message = f"the disk is full while {doing}; free space{disk_hint} and try again"
    else:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        message = f"{doing} failed ({type(exc).__name__}: {detail}); rerun with --debug and report it"
    with open(sys.argv[1], "w") as f:
        f.write(message)
    sys.exit(%d)
with open(sys.argv[1], "wb") as f:
    pickle.dump(result, f)
""" % FAILED


def call_in_fresh_process(fn, *args, doing: str, disk_hint: str = "", env: dict | None = None):
    """`fn(*args)` (a module-level function; arguments and result picklable) in a new interpreter.

    `doing` names the work in errors ("writing the float GGUF"); `disk_hint` adds what to free on a full disk;
    `env` replaces the child's environment (e.g. to limit its BLAS threads, which are fixed at import)."""
    with tempfile.TemporaryDirectory(prefix="edgeq-apart-") as tmp:
        job = Path(tmp) / "job.pickle"
        job.write_bytes(pickle.dumps((fn.__module__, fn.__name__, args, doing, disk_hint)))
        quiet = {"EDGEQ_QUIET_LIBRARIES": "1"} if logging.getLogger().getEffectiveLevel() > logging.INFO else {}
        status = subprocess.run([sys.executable, "-c", _CHILD, str(job)], env={**(env or os.environ), **quiet}).returncode
        if status == FAILED:
            raise EdgeqError(job.read_text())
        if status != 0:
            raise EdgeqError(f"the process {doing} died (exit {status}: out of memory or a backend crash); "
                             "free memory, or run it alone")
        return pickle.loads(job.read_bytes())
