"""Argument checks of the stream API, made to fail as fitstream 0.4.1 fails.

fitstream checks an argument with a plain comparison (`n < 0`, `patience < 1`...), so a
wrong type raises the comparison's own TypeError and a wrong value raises ValueError with
fitstream's sentence. These helpers run the same comparison and raise the same type with
fitstream's text first, then ours: the argument, the value and what is allowed. (The rule,
and where the stream API deliberately raises more than fitstream: docs/stream.md, "Errors".)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def detail(name: str, value: Any, allowed: str) -> str:
    """What we add after fitstream's message."""
    return f" Got {name}={value!r}; allowed: {allowed}."


def is_bad(name: str, value: Any, allowed: str, bad: Callable[[Any], Any]) -> bool:
    """`bad(value)`, fitstream's comparison; the TypeError of a value that cannot be
    compared (a string, None) keeps its text and gains the argument's name."""
    try:
        return bool(bad(value))
    except TypeError as error:
        raise TypeError(f"{error}.{detail(name, value, allowed)}") from None


def check(name: str, value: Any, allowed: str, bad: Callable[[Any], Any], message: str) -> None:
    """Raise ValueError(`message` + detail) where fitstream raises ValueError(`message`)."""
    if is_bad(name, value, allowed, bad):
        raise ValueError(message + detail(name, value, allowed))
