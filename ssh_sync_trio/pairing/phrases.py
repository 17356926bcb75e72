"""Pairing phrases: three words of the EFF large word list, joined by `-`.

The list ships inside the `xkcdpass` package (its `eff-long` file, the
7,776 words of the EFF large list); words are drawn with `secrets`.
"""

from __future__ import annotations

import functools
import secrets
from importlib import resources

WORDS_PER_PHRASE = 3


@functools.cache
def word_list() -> tuple[str, ...]:
    """The EFF large word list, read once."""
    text = resources.files("xkcdpass").joinpath("static/eff-long").read_text("utf-8")
    words = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(words) != 7776:
        raise RuntimeError(f"EFF large word list has {len(words)} words, expected 7776")
    return words


def make_phrase() -> str:
    """A fresh phrase such as `crane-mosaic-unroll`."""
    words = word_list()
    return "-".join(secrets.choice(words) for _ in range(WORDS_PER_PHRASE))


def normalise(typed: str) -> str:
    """A phrase as a person typed it, matched ignoring case and outer space."""
    return typed.strip().lower()
