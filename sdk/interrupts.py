"""SIGTERM, SIGHUP and Ctrl-C all become one KeyboardInterrupt that reaches edgeq's cleanup.

Left alone, `kill PID` (SIGTERM) ends an export on the spot and leaves its staging folder behind; inside
`terminate_as_interrupt()` it raises KeyboardInterrupt like Ctrl-C, so the stage is removed and the CLI
says "interrupted". One more trap: a signal handled while C code is calling back into Python (llama.cpp
logs through a ctypes callback while it loads a model) raises there, and ctypes prints the exception as
"ignored" and drops it. So that report is silenced, and the first signal is re-sent every half second
until edgeq's cleanup has seen the interrupt; from then on further signals are ignored, so a second
Ctrl-C cannot cut the cleanup short.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

_lock = threading.Lock()
_state = {"active": False, "signal": None, "seen": False, "round": 0}
SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def interrupt_seen() -> None:
    """Called where the interrupt is handled (cleanup begins): stops the re-sending, ignores further signals."""
    with _lock:
        _state["seen"] = True


def _resend(signum: int, round_: int) -> None:
    while True:
        time.sleep(0.5)
        with _lock:
            if _state["seen"] or not _state["active"] or _state["round"] != round_:
                return
            os.kill(os.getpid(), signum)


def _interrupt(signum, frame):
    if _state["seen"]:
        return
    if _state["signal"] is None:
        _state["signal"] = signum
        threading.Thread(target=_resend, args=(signum, _state["round"]), daemon=True, name="edgeq-interrupt").start()
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """For the duration, SIGTERM/SIGHUP/SIGINT raise KeyboardInterrupt (re-sent until seen). Nested uses and
    other threads than the main one (where Python cannot install handlers) leave the outer setting alone."""
    if threading.current_thread() is not threading.main_thread() or _state["active"]:
        yield
        return
    with _lock:
        _state.update(active=True, signal=None, seen=False, round=_state["round"] + 1)
    previous = {s: signal.signal(s, _interrupt) for s in SIGNALS}
    hook = sys.unraisablehook

    def unraisable(report):  # our interrupt, raised inside a C callback and dropped there: it is re-sent, not a bug
        if not isinstance(report.exc_value, KeyboardInterrupt):
            hook(report)

    sys.unraisablehook = unraisable
    try:
        yield
    except KeyboardInterrupt:
        interrupt_seen()
        raise
    finally:
        with _lock:
            _state.update(active=False, seen=True)
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook


def stop_children(since: float) -> None:
    """Ends the helper processes started since `since` (time.time()): the float-GGUF writer, say. An interrupt
    that lands while one is being started leaves it running on its own, to fail later on a stage that is gone;
    the CLI stops the ones its command started on the way out."""
    import psutil

    stopped = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.create_time() >= since - 0.02:  # create_time has clock-tick resolution
                child.kill()
                stopped.append(child)
        except psutil.Error:  # already gone
            pass
    psutil.wait_procs(stopped, timeout=5)
