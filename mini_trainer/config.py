"""Python config files with inheritance and command-line overrides.

A config file is plain Python. Its public top-level names (not modules, functions or
classes) form the config; if it defines `config = {...}`, that dict is the config instead.

    # configs/base.py
    trainer = dict(type="ClassificationTrainer", max_steps=1000, optimizer_cfg=dict(lr=1e-3))

    # configs/long.py
    parents = ["base.py"]                 # relative to this file; later parents win
    trainer = dict(max_steps=5000)        # merged into the parent's dict key by key

A dict that sets `_replace_=True` replaces its parent's dict instead of being merged.
Overrides are `key.path=value` strings; values are Python literals (`1e-3`, `[64, 64]`,
`None`, `'text'`) and anything else is taken as a string. List items are addressed by
index (`hooks.0.interval=5`). Nothing passed in is mutated.
"""

from __future__ import annotations

import ast
import copy
import runpy
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["load_config", "merge_configs", "apply_overrides", "parse_override"]

_REPLACE = "_replace_"


def load_config(path: str | Path, overrides: Iterable[str] | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read the config file at `path` (with its `parents`) and apply `overrides`."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"config path must be a str or Path; got {type(path).__name__} {path!r}")
    cfg = _load_file(Path(path), chain=())
    return apply_overrides(cfg, overrides) if overrides else cfg


def _load_file(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.expanduser()
    if path.suffix != ".py":
        raise ValueError(f"config path must be a Python file ending in .py; got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {str(path)!r}")
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise ValueError(f"config parents form a cycle: {cycle}")
    namespace = runpy.run_path(str(resolved), run_name="__mini_trainer_config__")
    if "config" in namespace:
        own = namespace["config"]
        if not isinstance(own, Mapping):
            raise TypeError(f"{path}: 'config' must be a dict; got {type(own).__name__}")
        parents = own.get("parents", namespace.get("parents", []))
        own = {k: v for k, v in own.items() if k != "parents"}
    else:
        parents = namespace.get("parents", [])
        own = {
            k: v
            for k, v in namespace.items()
            if not k.startswith("_")
            and k != "parents"
            and not isinstance(v, (types.ModuleType, types.FunctionType, type))
        }
    if isinstance(parents, (str, Path)):
        parents = [parents]
    if not isinstance(parents, (list, tuple)):
        raise TypeError(f"{path}: 'parents' must be a list of paths; got {parents!r}")
    merged: dict[str, Any] = {}
    for parent in parents:
        if not isinstance(parent, (str, Path)):
            raise TypeError(f"{path}: 'parents' entries must be paths; got {type(parent).__name__} {parent!r}")
        parent_path = Path(parent)
        if not parent_path.is_absolute():
            parent_path = resolved.parent / parent_path
        merged = merge_configs(merged, _load_file(parent_path, (*chain, resolved)))
    return merge_configs(merged, own)


def merge_configs(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping):
            value = dict(value)
            replace = value.pop(_REPLACE, False)
            if not replace and isinstance(out.get(key), Mapping):
                out[key] = merge_configs(out[key], value)
                continue
            out[key] = merge_configs({}, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"a.b.0=1e-3"` -> `(["a", "b", "0"], 0.001)`."""
    if not isinstance(text, str):
        raise TypeError(f"override must be a 'key.path=value' string; got {type(text).__name__} {_shorten(repr(text))}")
    key, sep, raw = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p for p in parts) or any(c.isspace() for c in key):
        raise ValueError(f"override {_shorten(repr(text))} must look like key.path=value (e.g. trainer.max_steps=100)")
    return parts, _parse_value(key, raw.strip())


def _parse_value(key: str, raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (MemoryError, RecursionError):
        # CPython's parser gives up on deep nesting ("too many nested parentheses").
        raise ValueError(
            f"override {_shorten(key)}=...: the value ({len(raw)} characters) is too deeply nested "
            "(or too long an expression) to parse"
        ) from None
    except (ValueError, SyntaxError):
        lowered = raw.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return raw


def apply_overrides(cfg: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `cfg` with each `key.path=value` (or `{key.path: value}`) applied.

    Every container on the path must exist; the last key may be new in a dict.
    """
    out = copy.deepcopy(dict(cfg))
    if isinstance(overrides, Mapping):
        items = [(str(k).split("."), copy.deepcopy(v)) for k, v in overrides.items()]
    elif isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'key.path=value' strings; got the string {overrides!r}")
    else:
        items = [parse_override(o) for o in overrides]
    for parts, value in items:
        node: Any = out
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, parts[: depth + 1])
        _assign(node, parts[-1], value, parts)
    return out


def _child(node: Any, part: str, path: list[str]) -> Any:
    where = ".".join(path)
    if isinstance(node, dict):
        if part not in node:
            raise KeyError(
                f"override path {where!r}: no key {part!r} (available: {', '.join(map(str, node)) or 'none'})"
            )
        return node[part]
    if isinstance(node, list):
        return node[_index(node, part, where)]
    raise KeyError(f"override path {where!r}: cannot index into {type(node).__name__}")


def _assign(node: Any, part: str, value: Any, path: list[str]) -> None:
    where = ".".join(path)
    if isinstance(node, dict):
        node[part] = value
    elif isinstance(node, list):
        node[_index(node, part, where)] = value
    else:
        raise KeyError(f"override path {where!r}: cannot set a key on {type(node).__name__}")


def _index(node: list, part: str, where: str) -> int:
    try:
        index = int(part)
    except ValueError:
        raise KeyError(f"override path {where!r}: {part!r} is not a list index") from None
    if not -len(node) <= index < len(node):
        raise KeyError(f"override path {where!r}: index {index} out of range for a list of {len(node)}")
    return index


def _shorten(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters for an error message (an override may be huge)."""
    return text if len(text) <= limit else f"{text[: limit - 30]}... ({len(text)} characters)"
