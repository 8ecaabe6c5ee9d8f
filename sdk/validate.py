"""Checks at the edge, one way: pydantic types that carry their valid range, turned into one EdgeqError line.

Everything a user hands edgeq (generation arguments, sizes, text files, JSON the runtime trusts) is
checked where it enters, so a bad value fails naming the field and its valid range instead of deep
inside a backend as a traceback or, worse, silently (a negative temperature that means greedy, a NaN
top_p that samples from nothing). The CLI checks the same ranges with click's own types
(`cli_types.py`), so both edges agree.
"""
from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Sequence

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import EdgeqError


def _no_text_or_bool(value):
    """pydantic's lax mode reads "1.5" and True as numbers; an argument written that way is a mistake."""
    if isinstance(value, (bool, str, bytes)):
        raise ValueError("must be a number, not " + type(value).__name__)
    return value


def _whole(value):
    """An integer, or anything that is one exactly (numpy ints); never 2.0, which a caller then passes on to range()."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError("must be an integer, not " + type(value).__name__)
    return operator.index(value)


Number = Annotated[float, BeforeValidator(_no_text_or_bool), Field(allow_inf_nan=False)]
Integer = Annotated[int, BeforeValidator(_whole)]


def where(loc: Sequence) -> str:
    """pydantic's error location as the user writes it: `messages[1].content`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":  # pydantic's mark for a bad dict key: the key itself is already named
            continue
        elif str(part).isidentifier():
            out += ("." if out else "") + str(part)
        else:
            out += f"[{str(part)!r}]"
    return out


def first_error(exc: ValidationError, prefix: str = "") -> tuple[str, str]:
    """(field, message) of the first problem; the others are counted, not listed (one line)."""
    error = exc.errors()[0]
    field = where([*([prefix] if prefix else []), *error["loc"]]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if exc.error_count() > 1:
        message += f" (and {exc.error_count() - 1} more problem(s))"
    return field, message


@lru_cache(maxsize=None)
def _adapter(annotation) -> TypeAdapter:
    return TypeAdapter(annotation)


@dataclass(frozen=True)
class Range:
    """An argument's type and valid range: the annotation pydantic checks, and the same range in words.

    The API checks arguments with `check`; the CLI's click types (cli_types.py) parse the text and then
    call the same `check`, so a range is written once and both edges say it the same way.
    """

    annotation: Any
    valid: str

    def check(self, name: str, value):
        try:
            return _adapter(self.annotation).validate_python(value)
        except ValidationError:
            raise EdgeqError(f"{name} must be {self.valid}, got {value!r}") from None


TEMPERATURE = Range(Annotated[Number, Field(ge=0)], "a number ≥ 0 (0 is greedy)")
TOP_P = Range(Annotated[Number, Field(gt=0, le=1)], "a number in (0, 1] (1 keeps every token)")
TOP_K = Range(Annotated[Integer, Field(ge=0)], "an integer ≥ 0 (0 keeps every token)")
REPETITION_PENALTY = Range(Annotated[Number, Field(gt=0)], "a number > 0 (1 is none)")
SEED = Range(Annotated[Integer, Field(ge=0)] | None, "an integer ≥ 0 (or none at all, for a random seed)")
MAX_NEW_TOKENS = Range(Annotated[Integer, Field(ge=1)], "an integer ≥ 1")
THREADS = Range(Annotated[Integer, Field(ge=1, le=4096)], "an integer from 1 to 4096")
CONTEXT = Range(Annotated[Integer, Field(ge=2)], "an integer ≥ 2 (a prompt token and the one it predicts)")
TOKENS = Range(Annotated[Integer, Field(ge=1)], "an integer ≥ 1")
TOKENS_OR_ZERO = Range(Annotated[Integer, Field(ge=0)], "an integer ≥ 0 (0 skips it)")
BITS_PER_WEIGHT = Range(Annotated[Number, Field(gt=0, le=32)], "a number above 0 and at most 32 (float32)")


# ---- generate() ----------------------------------------------------------------------------------------

class Message(BaseModel):
    """One chat message; other keys (name, tool_calls) pass through to the template untouched."""

    model_config = ConfigDict(extra="allow", strict=True, defer_build=True)
    role: Annotated[str, Field(min_length=1)]
    content: str


_MESSAGES = Annotated[list[Message], Field(min_length=1)]
MESSAGE_SHAPE = 'a non-empty list of {"role": str, "content": str} dicts'


def check_messages(messages) -> None:
    """Refuses what a chat template would render into garbage or fail on with a KeyError."""
    if not isinstance(messages, (list, tuple)):
        raise EdgeqError(f"messages must be {MESSAGE_SHAPE}, got {type(messages).__name__}")
    try:
        _adapter(_MESSAGES).validate_python(list(messages))
    except ValidationError as exc:
        field, message = first_error(exc, "messages")
        raise EdgeqError(f"{field}: {message}; messages must be {MESSAGE_SHAPE}") from None


def check_stops(stop) -> list[str]:
    """`stop` as a list; an empty stop string would end every generation before its first token."""
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise EdgeqError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stops):
        raise EdgeqError("stop strings must not be empty (an empty one matches before any text); drop it")
    return list(stops)


def check_generate_args(prompt, messages, max_new_tokens, stop) -> None:
    """What `generate()` takes besides the sampling parameters (those check themselves)."""
    if (prompt is None) == (messages is None):
        raise EdgeqError("pass exactly one of prompt= or messages=")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise EdgeqError(f"prompt must be a non-empty string, got {prompt!r}; pass messages= for a chat")
    if messages is not None:
        check_messages(messages)
    MAX_NEW_TOKENS.check("max_new_tokens", max_new_tokens)
    check_stops(stop)


# ---- sizes and budgets ---------------------------------------------------------------------------------

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}  # MB = MiB, as in planning since the start
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*", re.IGNORECASE)
MAX_SIZE = 1 << 50
SIZE_HELP = "a size above 0 bytes such as 95MB, 1.2GiB or 100000000"


def parse_size(size) -> int:
    """Bytes from `95MB`, `1.2GiB`, `500k` or a number of bytes; anything else is one EdgeqError line."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        value = float(size)
    elif isinstance(size, str):
        m = _SIZE.fullmatch(size)
        if not m or (m[3] and not m[2]):  # "5iB" names no unit
            raise EdgeqError(f"size {size!r} is not {SIZE_HELP}")
        value = float(m[1]) * _UNITS[m[2].lower()]
    else:
        raise EdgeqError(f"size must be {SIZE_HELP}, got {type(size).__name__}")
    if not 1 <= value <= MAX_SIZE:  # also nan and inf
        raise EdgeqError(f"size {size!r} is out of range; write {SIZE_HELP} (at most 1 PiB)")
    return int(value)


def check_engine_args(threads, n_ctx) -> None:
    """`threads` and `n_ctx` of load(), evaluate() and profile(): None means the default."""
    if threads is not None:
        THREADS.check("threads", threads)
    if n_ctx is not None:
        CONTEXT.check("n_ctx", n_ctx)


# ---- text files ----------------------------------------------------------------------------------------

def read_text_file(path: str | Path, what: str = "text file") -> str:
    """A user's text (calibration, eval): UTF-8, not binary, not empty, or one line saying which it is not.

    Decoding with errors="replace" would turn a PDF or a Latin-1 file into plausible-looking garbage
    that calibrates or measures the model on nonsense without a word.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(f"{what} {path} does not exist or is not a file; pass a UTF-8 text file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EdgeqError(f"{what} {path} cannot be read ({exc.strerror}); check its permissions") from None
    if b"\x00" in data[:1 << 16]:
        raise EdgeqError(f"{what} {path} is a binary file, not text; pass a UTF-8 text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EdgeqError(f"{what} {path} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                         "re-save it as UTF-8") from None
    if not text.strip():
        raise EdgeqError(f"{what} {path} is empty; pass a file with text in it")
    return text


def read_json_object(path: str | Path, fix: str) -> dict:
    """A JSON file that must hold an object (a config, a manifest); `fix` says what to do when it does not."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise EdgeqError(f"{path} cannot be read ({exc.strerror}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise EdgeqError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); {fix}") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, or nested past the parser's depth
        raise EdgeqError(f"{path} is not valid JSON ({type(exc).__name__}); {fix}") from None
    if not isinstance(data, dict):
        raise EdgeqError(f"{path} holds a JSON {json_type(data)}, not an object; {fix}")
    return data


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages about files the user wrote."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)
