"""Integer arguments of the stream API, checked the way fitstream's callers expect.

Not `mini_trainer.utils.check_int`: fitstream accepts numpy integers (anything with
`__index__`) wherever it takes an int, and reports a bad positive count (`batch_size`,
`every`, `start`) as ValueError whatever its type, so code written for it behaves the same
here.
"""

from __future__ import annotations

import operator
from typing import Any


def to_int(name: str, value: Any) -> int:
    """`value` as an int: Python and numpy integers (anything with `__index__`), not bools.
    Raises TypeError naming `name` otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}") from None


def to_positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1 (numpy integers too); ValueError naming `name` for anything
    else, a wrong type included."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or operator.index(value) < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return operator.index(value)
