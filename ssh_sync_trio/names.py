"""The rules for user, machine and key names, shared by HTTP and pairing."""

from __future__ import annotations

import unicodedata

MAX_NAME = 255


def has_control(text: str) -> bool:
    """Whether `text` holds a control character (Unicode category Cc)."""
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def storable(text: str) -> bool:
    """Whether a database column can hold `text` at all.

    JSON can carry NUL (which PostgreSQL text cannot hold) and, through
    `\\ud800` escapes, lone surrogates (which no driver can encode): such
    text would fail in the database rather than as bad input.
    """
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a user or machine name, or None if it can."""
    if not name:
        return "must not be empty"
    if not storable(name):
        return "holds a character no database can store"
    if len(name) > MAX_NAME:
        return f"longer than {MAX_NAME} characters"
    if "/" in name or has_control(name):
        return "holds a control character or '/'"
    return None
