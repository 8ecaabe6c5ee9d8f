"""Chat templates run in Jinja's immutable sandbox, with a time, memory and output-size limit.

A chat template is code that comes with a checkpoint or a bundle, written by someone else. The sandbox
stops it from reaching Python internals but not from looping for hours or building a string of
gigabytes, and `run` or `generate()` would hang on such a template. So a render is bounded three ways:
the template's own lines are traced against a deadline and against peak-memory growth (a loop in a loop
that writes nothing is caught there); the output is streamed and counted; and the single operations
that could allocate too much in one C call (`"x" * 10**9`, `10 ** 10**9`, `"x".center(10**9)`, a
`%999999999d` format) are refused before they run. A real template renders in milliseconds and a few
KiB, far inside every limit.
"""
from __future__ import annotations

import functools
import json
import re
import sys
import time
from datetime import datetime

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import EdgeqError

MAX_SECONDS = 2.0
MAX_CHARS = 4 << 20        # a rendered prompt far longer than any context edgeq runs
MAX_GROWTH = 256 << 20     # bytes of peak memory one render may add
_WIDE_FORMAT = re.compile(r"\d{7,}")  # a width or precision of a million characters or more


class TemplateLimit(Exception):
    """A render went past a limit; becomes an EdgeqError naming which one."""


def _too_big(value) -> bool:
    return isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_CHARS


def _check_arguments(args, kwargs) -> None:
    """A number that large passed to a filter or a method is a width or a count that would allocate it."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
            raise TemplateLimit(f"an argument of {value} (over {MAX_CHARS:,})")


def _check_format(fmt) -> None:
    if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
        raise TemplateLimit("a format width of a million characters or more")


def _guarded(function):
    """A filter that refuses huge arguments and huge results (Jinja calls filters directly, not through `call`)."""
    @functools.wraps(function)  # keeps jinja's pass_context / pass_environment marks
    def guarded(*args, **kwargs):
        _check_arguments(args, kwargs)
        if function.__name__ == "do_format" and args:
            _check_format(args[0])
        result = function(*args, **kwargs)
        if _too_big(result):
            raise TemplateLimit(f"a filter result over {MAX_CHARS:,} characters")
        return result
    return guarded


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def call_binop(self, context, operator, left, right):
        sizes = [len(v) for v in (left, right) if isinstance(v, (str, list, tuple))]
        numbers = [v for v in (left, right) if isinstance(v, int) and not isinstance(v, bool)]
        if operator == "*" and sizes and numbers and sizes[0] * max(numbers[0], 0) > MAX_CHARS:
            raise TemplateLimit(f"a repetition over {MAX_CHARS:,} items")
        if operator == "**" and len(numbers) == 2 and abs(right) > 1024 and abs(left) > 1:
            raise TemplateLimit(f"a power of {right}")
        if operator == "+" and len(sizes) == 2 and sum(sizes) > MAX_CHARS:
            raise TemplateLimit(f"a concatenation over {MAX_CHARS:,} items")
        if operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _check_arguments(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):
        """`"{:>999999999}".format(1)`: jinja swaps str.format for its own wrapper as the attribute is read."""
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped


def environment() -> LimitedEnvironment:
    """The environment HF chat templates expect: loop controls, `tojson`, `raise_exception`, `strftime_now`."""
    def raise_exception(message):
        raise EdgeqError(f"the chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _guarded(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def compile_template(source: str):
    """The compiled template, or one line saying where its Jinja is wrong."""
    if not isinstance(source, str):
        raise EdgeqError(f"the chat template must be a string, got {type(source).__name__}; fix chat_template in tokenizer_config.json")
    try:
        return environment().from_string(source)
    except TemplateError as exc:
        line = f", line {exc.lineno}" if getattr(exc, "lineno", None) else ""
        raise EdgeqError(f"the chat template is not valid Jinja ({exc.message}{line}); fix chat_template "
                         "in tokenizer_config.json or chat_template.jinja") from None
    except RecursionError:
        raise EdgeqError("the chat template is nested too deeply to compile; fix chat_template") from None


def _peak_memory() -> int:
    try:
        import resource
    except ImportError:  # Windows: no getrusage; the time and size limits still hold
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def render(template, **variables) -> str:
    """Renders within the limits; every failure of the template is one EdgeqError line."""
    deadline = time.perf_counter() + MAX_SECONDS
    memory_cap = _peak_memory() + MAX_GROWTH

    def each_line(frame, event, arg):
        if time.perf_counter() > deadline:
            raise TemplateLimit(f"more than {MAX_SECONDS:g} s")
        if _peak_memory() > memory_cap:
            raise TemplateLimit(f"more than {MAX_GROWTH >> 20} MiB of memory")
        return each_line

    def each_call(frame, event, arg):  # only the template's own code is traced, line by line
        return each_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(each_call)
    pieces, size = [], 0
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > MAX_CHARS:
                raise TemplateLimit(f"an output over {MAX_CHARS:,} characters")
            pieces.append(piece)
    except TemplateLimit as exc:
        raise EdgeqError(f"the chat template went past its limit ({exc}) on these messages; "
                         "it is not a chat template edgeq will run: fix chat_template") from None
    except EdgeqError:
        raise
    except (Exception, RecursionError) as exc:  # noqa: BLE001 - anything a template raises is the template's failure
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise EdgeqError(f"the chat template failed on these messages ({type(exc).__name__}: {detail})") from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)
