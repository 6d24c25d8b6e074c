"""Plain Python values out of tensors, for whatever leaves the process: collected stream
events, JSON lines, W&B logs and configs.

The rule is the same everywhere: a 0-d tensor (or a numpy scalar) becomes the Python
number it holds; reading a device tensor is a host sync, so call these where the value
leaves anyway. Two walkers apply it, because their callers need different things:

- `to_plain` keeps the structure as it is (tuples, namedtuples, unchanged objects), for
  values that stay in Python (`mini_trainer.stream.collect`, `WandbHook` logs);
- `json_safe` makes something strict JSON can hold (string keys, lists, text for
  unknown objects, no NaN or infinity), for `metrics.jsonl` and W&B configs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["to_plain", "json_safe"]


def _number(value: Any) -> Any:
    """The Python number in a 0-d tensor or numpy scalar; anything else as it is."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def to_plain(value: Any) -> Any:
    """`value` with every 0-d tensor (or numpy scalar) in it as a Python number, also
    inside dicts, lists and tuples (namedtuples keep their type).

    Everything else is returned as it is, and so is a container with nothing to convert:
    the same object, not a copy. A dict with something converted comes back as a plain
    dict, a list as a list.
    """
    if isinstance(value, dict):
        items = {k: to_plain(v) for k, v in value.items()}
        return items if any(items[k] is not v for k, v in value.items()) else value
    if isinstance(value, (list, tuple)):
        converted = [to_plain(v) for v in value]
        if all(a is b for a, b in zip(converted, value, strict=True)):
            return value
        if isinstance(value, list):
            return converted
        return type(value)(*converted) if hasattr(value, "_fields") else type(value)(converted)
    return _number(value)


def json_safe(value: Any, *, non_finite_as_text: bool = False) -> Any:
    """A copy of `value` that `json.dumps(..., allow_nan=False)` accepts.

    Mappings become dicts with `str` keys, lists and tuples become lists, 0-d tensors and
    numpy scalars become numbers; None, bools, ints, floats and strings stay; anything
    else becomes its `str()`. JSON has no NaN or infinity: non-finite floats become None
    (null), or with `non_finite_as_text` their text (`"nan"`, `"inf"`, `"-inf"`).
    """
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, non_finite_as_text=non_finite_as_text) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, non_finite_as_text=non_finite_as_text) for v in value]
    value = _number(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value) if non_finite_as_text else None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
