"""Bounded parsing of what clients send: JSON bodies and frames, query strings, uploads.

Why one module: every entry point that reads untrusted bytes (the REST API, the OpenAI API,
both websockets, the pages' query strings, dataset uploads) must do bounded work for any input
and answer a mistake with an error that names it, never with a 500 or a dropped socket. Python's
`json` recurses once per nesting level, so a body nested 100k deep raised RecursionError (a 500,
or a websocket closed with 1011); a NUL in a query string or an integer past the database's
column range failed inside the database driver; an upload could fill the disk.

The limits are settings, read when used (so a deployment or a test can change them):
- API_MAX_BODY_BYTES: the largest JSON body or websocket frame parsed (default 1 MiB: the
  largest legitimate request, a chat of CHAT_LIMITS["max_total_chars"] characters, is well
  under 300 KB even with every character escaped, and daphne refuses websocket messages over
  1 MiB anyway, see nanochat_site/webserver.py);
- JSON_MAX_DEPTH: the deepest nesting of arrays and objects accepted (default 64; the deepest
  legitimate document, a run config with its nested options, is under 5 levels);
- UPLOAD_MAX_BYTES: the total size of the files uploaded for one dataset (default 1 GiB).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

from training.flags import ConfigError

# Integers in query strings are compared with 32-bit database columns (steps, event numbers)
# or ids; past this range PostgreSQL refuses the query and SQLite's driver overflows.
QUERY_INT_MIN = -(2**31)
QUERY_INT_MAX = 2**31 - 1


class InputError(ValueError):
    """Client input that cannot be accepted; the message says why, for the client to read."""


# ---- JSON ---------------------------------------------------------------------------------


def parse_json(data: str | bytes, *, what: str = "body", encoding: str = "utf-8") -> Any:
    """`data` parsed as strict JSON (no NaN/Infinity), within the size and depth limits.

    Raises InputError naming the problem ("the body is larger than 1048576 bytes", "JSON nested
    deeper than 64 levels", "the frame is not valid JSON: ..."). Deep input cannot exhaust the
    stack: the parser's own recursion guard stops it, and depth is then measured iteratively.
    """
    max_bytes, max_depth = settings.API_MAX_BODY_BYTES, settings.JSON_MAX_DEPTH
    size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InputError(f"the {what} is larger than {max_bytes} bytes")
    if isinstance(data, bytes):
        try:
            data = data.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            raise InputError(f"the {what} is not valid {encoding} text") from None
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise InputError(f"JSON nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise InputError(f"the {what} is not valid JSON: {exc.msg} ({where})") from None
    except ValueError as exc:
        raise InputError(f"the {what} is not valid JSON: {exc}") from None
    if nesting_exceeds(value, max_depth):
        raise InputError(f"JSON nested deeper than {max_depth} levels")
    return value


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest more than `limit` levels (a bare list is 1), without
    recursion: one level of containers at a time, stopping at the first level too deep."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        level = [
            child
            for item in level
            for child in (item.values() if type(item) is dict else item)
            if type(child) is list or type(child) is dict
        ]
    return False


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class BoundedJSONDecoder(json.JSONDecoder):
    """For DRF's `JSONField(decoder=...)`: JSON sent as a form field (a multipart `config` or
    `options`) gets the same limits; InputError is a ValueError, which the field reports as
    "Value must be valid JSON." under its own name."""

    def decode(self, s, *args) -> Any:
        return parse_json(s, what="value")


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser with the limits: reads at most one byte past API_MAX_BODY_BYTES, and
    answers a body too big, too deep or malformed with a 400 that says which."""

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        encoding = parser_context.get("encoding", settings.DEFAULT_CHARSET)
        body = stream.read(settings.API_MAX_BODY_BYTES + 1) if stream is not None else b""
        try:
            return parse_json(body, encoding=encoding)
        except InputError as exc:
            raise ParseError(str(exc)) from None


# ---- query strings ------------------------------------------------------------------------


class QueryParamError(ValueError):
    """A query parameter that cannot be used; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def query_text(params: Mapping[str, str], name: str, default: str = "") -> str:
    """A text parameter; one with a NUL character (which no database column can hold) is an
    error rather than a query the database driver refuses."""
    value = params.get(name, default)
    if "\x00" in value:
        raise QueryParamError(name, "must not contain NUL characters")
    return value


def query_int(
    params: Mapping[str, str],
    name: str,
    default: int | None = None,
    lo: int = QUERY_INT_MIN,
    hi: int = QUERY_INT_MAX,
) -> int | None:
    """An integer parameter in [lo, hi]; absent or blank gives `default`."""
    raw = params.get(name, "")
    if raw.strip() == "":
        return default
    return to_int(raw, name, lo, hi)


def to_int(raw: str, name: str, lo: int = QUERY_INT_MIN, hi: int = QUERY_INT_MAX) -> int:
    """`raw` as a decimal integer in [lo, hi], else QueryParamError naming `name`."""
    text = raw.strip()
    digits = text[1:] if text[:1] in "+-" else text
    # ASCII digits only: str.isdigit() accepts "²", which int() refuses. The length bound
    # keeps int() from converting a megabyte of digits.
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 20:
        raise QueryParamError(name, f"must be a whole number between {lo} and {hi}")
    value = int(text)
    if not lo <= value <= hi:
        raise QueryParamError(name, f"must be between {lo} and {hi}")
    return value


def out_of_range(values: Mapping[str, Any]) -> dict[str, str]:
    """{name: message} for each integer among already-parsed query values that falls outside
    the range a database column can compare with (DRF's IntegerField sets no range itself)."""
    return {
        name: f"must be between {QUERY_INT_MIN} and {QUERY_INT_MAX}"
        for name, value in values.items()
        if isinstance(value, int)
        and not isinstance(value, bool)
        and not QUERY_INT_MIN <= value <= QUERY_INT_MAX
    }


# ---- uploads --------------------------------------------------------------------------------


def check_upload_sizes(uploads: Iterable[UploadedFile]) -> None:
    """ConfigError naming `files` when the uploads add up to more than UPLOAD_MAX_BYTES.

    Their sizes are what the server received (Django counts while spooling them to temporary
    files), so this refuses an upload before anything is created for it.
    """
    total = sum(upload.size or 0 for upload in uploads)
    if total > settings.UPLOAD_MAX_BYTES:
        raise ConfigError({"files": _too_big(total)})


def write_uploads(pairs: Iterable[tuple[UploadedFile, Path]]) -> None:
    """Copy each upload to its target path, counting bytes as they are written.

    On going over UPLOAD_MAX_BYTES in all, every file written so far (the partial one too) is
    removed and ConfigError names `files`: nothing of a refused upload stays on disk.
    """
    pairs = list(pairs)
    check_upload_sizes(upload for upload, _ in pairs)
    limit, total, written = settings.UPLOAD_MAX_BYTES, 0, []
    try:
        for upload, target in pairs:
            written.append(target)
            with open(target, "wb") as out:
                for chunk in upload.chunks():
                    total += len(chunk)
                    if total > limit:
                        raise ConfigError({"files": _too_big(total)})
                    out.write(chunk)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _too_big(size: int) -> str:
    return f"the files add up to {size} bytes or more; at most {settings.UPLOAD_MAX_BYTES} in all"
