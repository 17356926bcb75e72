"""The rules for user, machine and key names, shared by HTTP and pairing."""

from __future__ import annotations

import unicodedata

MAX_NAME = 255


def has_control(text: str) -> bool:
    """Whether `text` holds a control character (Unicode category Cc)."""
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a user or machine name, or None if it can."""
    if not name:
        return "must not be empty"
    if len(name) > MAX_NAME:
        return f"longer than {MAX_NAME} characters"
    if "/" in name or has_control(name):
        return "holds a control character or '/'"
    return None
