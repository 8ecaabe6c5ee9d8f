"""click parameter types for the CLI's numbers, sizes and files, checked with the API's own ranges.

click parses the text (`--seed abc` is not an integer); the value is then checked against the same
`validate.Range` the Python API checks, so `--seed -1` and `seed=-1` fail with the same range in words,
and click reports it as a usage error before any model loads.
"""
from __future__ import annotations

import click

from . import validate
from .errors import EdgeqError


class Checked(click.ParamType):
    """A number parsed by click's own type, then held to an API range."""

    def __init__(self, valid: validate.Range, parse: click.ParamType):
        self.valid, self.parse, self.name = valid, parse, parse.name

    def convert(self, value, param, ctx):
        value = self.parse.convert(value, param, ctx)
        try:
            return self.valid.check(param.name if param else "value", value)
        except EdgeqError:
            self.fail(f"{value!r} is not {self.valid.valid}", param, ctx)


class Size(click.ParamType):
    """A byte size: 95MB, 1.2GiB or a plain number of bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        try:
            return validate.parse_size(value)
        except EdgeqError as exc:
            self.fail(str(exc), param, ctx)


class TextFile(click.ParamType):
    """A UTF-8 text file with text in it (calibration, eval); the path is passed on, the check fails early."""

    name = "file"

    def __init__(self, what: str):
        self.what = what

    def convert(self, value, param, ctx):
        try:
            validate.read_text_file(value, self.what)
        except EdgeqError as exc:
            self.fail(str(exc), param, ctx)
        return value


class NonEmpty(click.ParamType):
    """Text that must not be empty: an empty prompt has no token to start from, an empty stop string
    would match before the first one."""

    name = "text"

    def convert(self, value, param, ctx):
        if value == "":
            self.fail("must not be empty", param, ctx)
        return value


class TokenCounts(click.ParamType):
    """A comma-separated list of token counts, each ≥ 1 (profile --prompt-tokens)."""

    name = "n,n,…"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            counts = [int(n) for n in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of token counts, e.g. 64,512", param, ctx)
        if not counts or min(counts) < 1:
            self.fail(f"{value!r} holds a count below 1; every prompt length must be ≥ 1", param, ctx)
        return counts


SEED = Checked(validate.SEED, click.INT)
THREADS = Checked(validate.THREADS, click.INT)
TEMPERATURE = Checked(validate.TEMPERATURE, click.FLOAT)
TOP_P = Checked(validate.TOP_P, click.FLOAT)
TOP_K = Checked(validate.TOP_K, click.INT)
REPETITION_PENALTY = Checked(validate.REPETITION_PENALTY, click.FLOAT)
MAX_NEW_TOKENS = Checked(validate.MAX_NEW_TOKENS, click.INT)
CONTEXT = Checked(validate.CONTEXT, click.INT)
TOKENS = Checked(validate.TOKENS, click.INT)
TOKENS_OR_ZERO = Checked(validate.TOKENS_OR_ZERO, click.INT)
BITS_PER_WEIGHT = Checked(validate.BITS_PER_WEIGHT, click.FLOAT)
SIZE = Size()


def progress_flag() -> bool | None:
    """--progress / --no-progress of the whole command line; None shows bars only on a terminal."""
    return click.get_current_context().find_root().obj.get("progress")
