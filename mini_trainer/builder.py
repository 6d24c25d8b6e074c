"""A registry of buildable things and `build_from_cfg`, which turns config dicts into objects.

    @REGISTRY.register()
    class MyTrainer(BaseTrainer): ...

    trainer = build_from_cfg({"type": "MyTrainer", "max_steps": 100})
    opt = build_from_cfg({"type": "torch.optim.AdamW", "lr": 3e-4}, params=model.parameters())

`type` is a registered name, a dotted import path, or the callable itself. With
`recursive=True`, nested dicts that have a `type` (also inside lists and tuples) are built
first, except under keys ending in `_cfg`: those stay plain dicts so the receiver can build
them later with arguments it only has then (an optimizer needs the model's parameters).
"""

from __future__ import annotations

import copy
import difflib
import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["Registry", "REGISTRY", "build_from_cfg", "resolve_type"]

T = TypeVar("T")


class Registry:
    """Name -> callable mapping, filled with `register()`."""

    def __init__(self, name: str = "registry") -> None:
        self.name = name
        self._entries: dict[str, Callable[..., Any]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def register(self, obj: Any = None, *, name: str | None = None, force: bool = False) -> Any:
        """Register a class or function under `name` (default: its `__name__`).

        Usable as `@REGISTRY.register()`, `@REGISTRY.register`, `@REGISTRY.register(name="x")`
        or `REGISTRY.register(cls)`. Registering a different object under a taken name is an
        error unless `force=True`.
        """
        if name is not None and not isinstance(name, str):
            raise TypeError(f"register: name must be a string; got {type(name).__name__}")

        def add(target: T) -> T:
            if not callable(target):
                raise TypeError(f"register: only classes and functions can be registered; got {target!r}")
            key = name or target.__name__
            existing = self._entries.get(key)
            if existing is not None and existing is not target and not force:
                raise KeyError(
                    f"{self.name}: {key!r} is already registered to {_qualname(existing)}; "
                    "pass name=... or force=True"
                )
            self._entries[key] = target
            return target

        if obj is None:
            return add
        if isinstance(obj, str):  # @register("name") shorthand
            name = obj
            return add
        return add(obj)

    def get(self, name: str) -> Callable[..., Any]:
        """The registered callable `name`, or the object at dotted path `name`."""
        if name in self._entries:
            return self._entries[name]
        if "." in name:
            module_name, _, attr = name.rpartition(".")
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise KeyError(f"type {name!r}: cannot import module {module_name!r} ({err})") from err
            try:
                return getattr(module, attr)
            except AttributeError:
                raise KeyError(f"type {name!r}: module {module_name!r} has no attribute {attr!r}") from None
        close = difflib.get_close_matches(name, self._entries, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(
            f"type {name!r} is not registered in {self.name} and is not a dotted import path "
            f"(registered: {', '.join(self.names()) or 'nothing'}){hint}"
        )


REGISTRY = Registry("mini_trainer.REGISTRY")


def resolve_type(type_: Any, registry: Registry = REGISTRY) -> Callable[..., Any]:
    if isinstance(type_, str):
        return registry.get(type_)
    if callable(type_):
        return type_
    raise TypeError(f"cfg['type'] must be a registered name, a dotted path or a callable; got {type_!r}")


def build_from_cfg(
    cfg: Mapping[str, Any],
    recursive: bool = True,
    registry: Registry = REGISTRY,
    **kwargs: Any,
) -> Any:
    """Build `cfg["type"](**rest_of_cfg, **kwargs)`; `kwargs` win over the config's keys.

    The config is never mutated. Errors name the type that failed to build.
    """
    if not isinstance(cfg, Mapping):
        raise TypeError(f"build_from_cfg: cfg must be a dict with a 'type' key; got {type(cfg).__name__}")
    if "type" not in cfg:
        raise KeyError(f"build_from_cfg: cfg has no 'type' key (keys: {', '.join(map(str, cfg)) or 'none'})")
    args = {k: copy.deepcopy(v) for k, v in cfg.items() if k != "type"}
    if recursive:
        args = {k: v if k.endswith("_cfg") else _build_nested(v, registry) for k, v in args.items()}
    args.update(kwargs)
    factory = resolve_type(cfg["type"], registry)
    try:
        return factory(**args)
    except TypeError as err:
        raise TypeError(f"building {_qualname(factory)} from config failed: {err}") from err


def build_config_trainer(cfg: Mapping[str, Any]) -> Any:
    """Import a config's `imports` (modules that register the user's classes), then build its
    `trainer` entry. What is wrong in the config is a TypeError, ImportError or KeyError
    saying so."""
    imports = cfg.get("imports", [])
    if not isinstance(imports, (list, tuple)):
        raise TypeError(f"config 'imports' must be a list of module names; got {imports!r}")
    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"config 'imports': cannot import {module!r} ({err})") from err
    if "trainer" not in cfg:
        raise KeyError(f"the config has no 'trainer' entry (keys: {', '.join(cfg) or 'none'}); "
                       "define trainer = dict(type=..., ...)")
    return build_from_cfg(cfg["trainer"])


def _build_nested(value: Any, registry: Registry) -> Any:
    if isinstance(value, Mapping):
        if "type" in value:
            return build_from_cfg(value, recursive=True, registry=registry)
        return {k: v if str(k).endswith("_cfg") else _build_nested(v, registry) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_build_nested(v, registry) for v in value)
    return value


def _qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or repr(obj)
    return f"{module}.{name}" if module else name
