"""Tags and notes on runs: what a tag may be and how it is written, checked in one place.

The run page's form and the API's PATCH both go through `clean_tags` and `clean_note` (via
services.set_tags_note), so "Baseline " typed in a form and "baseline" sent by a script are the
same tag, and a bad value is the same field-named error (a 400 in the API) everywhere.
"""

from __future__ import annotations

import re
from typing import Any

from training.flags import ConfigError

TAG_MAX_LENGTH = 40
MAX_TAGS = 20
NOTE_MAX_LENGTH = 20_000
# Letters and digits (any script), and - _ . : / and space: readable in a URL and a table.
TAG_PATTERN = re.compile(r"[^\W_]|[-_.:/ ]")


def normalize_tag(text: str) -> str:
    """`text` trimmed and lowercased; ValueError (its message says why) when it is no tag."""
    tag = text.strip().lower()
    if not tag:
        raise ValueError("a tag must not be empty")
    if len(tag) > TAG_MAX_LENGTH:
        raise ValueError(f"{tag[:20]!r}… is longer than {TAG_MAX_LENGTH} characters")
    if not all(TAG_PATTERN.fullmatch(c) for c in tag):
        raise ValueError(f"{tag!r} may hold only letters, digits, spaces and - _ . : /")
    return tag


def clean_tags(value: Any) -> list[str]:
    """The tags of `value` (a list of strings, or one string of comma-separated tags as the
    run page's form sends), normalized, duplicates and empty entries dropped, in the order
    given; ConfigError naming `tags` when one is no tag or there are too many."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError({"tags": "must be a list of strings"})
    tags: list[str] = []
    for text in value:
        if not text.strip():
            continue
        try:
            tag = normalize_tag(text)
        except ValueError as exc:
            raise ConfigError({"tags": str(exc)}) from None
        if tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise ConfigError({"tags": f"use at most {MAX_TAGS} tags (got {len(tags)})"})
    return tags


def clean_note(value: Any) -> str:
    """The note as stored (markdown text, shown escaped); ConfigError naming `note` when it
    is not text, too long, or holds a NUL no database column can store."""
    if not isinstance(value, str):
        raise ConfigError({"note": "must be a string"})
    if len(value) > NOTE_MAX_LENGTH:
        raise ConfigError({"note": f"use at most {NOTE_MAX_LENGTH} characters"})
    if "\x00" in value:
        raise ConfigError({"note": "must not contain NUL characters"})
    return value


def filter_tag(text: str) -> str:
    """A `?tag=` filter as a stored tag would read: trimmed and lowercased ("Baseline " finds
    "baseline"); text that could be no tag is kept as it is and simply matches no run."""
    return text.strip().lower()
