"""llama.cpp's process-wide set-up, shared by the llama.cpp engine and the GGUF quantizer.

llama.cpp logs to stderr by default; edgeq routes its lines to Python logging (and, for the duration of
`llama_log_lines`, to a handler that drives a progress bar). Importing this module does it once.
"""
from __future__ import annotations

import ctypes
import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import llama_cpp

log = logging.getLogger("edgeq.llama_cpp")
_line_handlers: list[Callable[[str], None]] = []


@llama_cpp.llama_log_callback
def route_log(level, text, user_data):
    line = text.decode("utf-8", errors="replace").rstrip()
    if _line_handlers:
        _line_handlers[-1](line)
    if line:
        log.debug(line)


llama_cpp.llama_log_set(route_log, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


@contextmanager
def llama_log_lines(handler: Callable[[str], None]) -> Iterator[None]:
    """Sends llama.cpp's log lines to `handler` for the duration (e.g. to drive a progress bar)."""
    _line_handlers.append(handler)
    try:
        yield
    finally:
        _line_handlers.remove(handler)
