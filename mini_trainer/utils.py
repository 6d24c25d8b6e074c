"""Small helpers shared by the trainer, the hooks and user code.

- `map_nested_tensor` applies a function to every tensor inside nested containers.
- `unwrap` peels torch.compile, DDP/FSDP1 and AveragedModel wrappers off a model.
- `check_*` validators raise errors that name the argument, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "map_nested_tensor",
    "flatten_dict",
    "unflatten_dict",
    "unwrap",
    "eval_mode",
    "check_int",
    "check_number",
    "check_choice",
]


# ---------------------------------------------------------------------------- nesting


def map_nested_tensor(fn: Callable[[torch.Tensor], Any], data: Any) -> Any:
    """Return `data` with `fn` applied to every tensor inside dicts, lists, tuples and
    namedtuples (container types are preserved; anything else is returned as is)."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        mapped = {k: map_nested_tensor(fn, v) for k, v in data.items()}
        if type(data) is dict:
            return mapped
        try:
            return type(data)(mapped)
        except TypeError:  # e.g. defaultdict needs its factory first
            out = type(data).__new__(type(data))
            out.__init__(getattr(data, "default_factory", None), mapped)  # type: ignore[misc]
            return out
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(map_nested_tensor(fn, v) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(map_nested_tensor(fn, v) for v in data)
    return data


def to_device(data: Any, device: torch.device | str) -> Any:
    """`data` with every tensor inside it copied to `device` (non-blocking: overlaps with
    compute when the source is pinned memory)."""
    return map_nested_tensor(lambda t: t.to(device, non_blocking=True), data)


def flatten_dict(nested: Mapping, sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`. Keys must be strings."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_dict(value, sep, name))
        else:
            flat[name] = value
    return flat


def unflatten_dict(flat: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """Inverse of `flatten_dict`."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(sep)
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


# ---------------------------------------------------------------------------- models


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` (and all its submodules) in eval mode for the block, then give every
    module back the mode it had, also when the block raises: a model that was half in
    train mode (a frozen BatchNorm) comes back exactly so."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def unwrap(model: nn.Module) -> nn.Module:
    """Peel torch.compile, DistributedDataParallel / DataParallel / FSDP1 and
    `torch.optim.swa_utils.AveragedModel` wrappers off `model`."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    from torch.optim.swa_utils import AveragedModel

    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, (DistributedDataParallel, DataParallel, AveragedModel)):
            model = model.module
        elif type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module"):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------------------- validation


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, allow_none: bool = False
) -> None:
    """Raise unless `value` is an int (not bool) in `minimum..maximum` (or None when allowed)."""
    if value is None and allow_none:
        return
    if minimum is not None and maximum is not None:
        allowed = f"an integer in {minimum}..{maximum}"
    else:
        allowed = (
            "an integer"
            + (f" >= {minimum}" if minimum is not None else "")
            + (f" <= {maximum}" if maximum is not None else "")
        )
    if allow_none:
        allowed += " or None"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {allowed}; got {type(value).__name__} {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def check_number(
    name: str, value: Any, *, positive: bool = False, allow_none: bool = False
) -> None:
    """Raise unless `value` is a finite real number (> 0 when `positive`)."""
    if value is None and allow_none:
        return
    allowed = ("a positive" if positive else "a") + " finite number" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {allowed}; got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def in_workspace(workspace: Path | None, path: str | os.PathLike) -> Path:
    """`path` as a run file: a relative path is taken inside `workspace` (without one: the
    current directory), an absolute path as it is."""
    path = Path(path)
    return workspace / path if workspace is not None and not path.is_absolute() else path


def run_file(argument: str, path: str | os.PathLike | None, workspace: Path | None, default: str) -> Path:
    """Where a logger writes: `path` (see `in_workspace`), or `<workspace>/<default>` when it is
    None; a ValueError naming `argument` when there is neither."""
    if path is not None:
        return in_workspace(workspace, path)
    if workspace is None:
        raise ValueError(f"{argument} is None and the trainer has no workspace: pass {argument.split('.')[-1]}=... "
                         f"or give the trainer a workspace (then: <workspace>/{default})")
    return workspace / default


def create_directory(name: str, path: Path) -> None:
    """`path` and its parents, or an OSError naming the argument `name` and why."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(err.errno, f"{name} {str(path)!r} cannot be created: {err.strerror or err}") from None


def check_flag(name: str, value: Any) -> None:
    """Raise TypeError, naming `name`, unless `value` is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")


def as_path(name: str, value: Any) -> Path:
    """`value` as a Path; a TypeError naming `name` unless it is a str or an os.PathLike."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike; got {type(value).__name__} {value!r}")
    return Path(value)


def check_directory_path(name: str, path: str | os.PathLike) -> None:
    """Raise ValueError, naming `name`, unless `path` can be a directory: no NUL byte, names
    and the whole path within the filesystem's limits, and no existing file in the way
    (at the path itself or a parent). Whether it can be written is known only on creation."""
    text = os.fspath(path)
    if "\x00" in text:
        raise ValueError(f"{name} must not contain a NUL byte; got {text[:80]!r}")
    if not text:
        raise ValueError(f"{name} must not be empty")
    absolute = Path(text).absolute()
    existing = absolute
    while existing != existing.parent:
        try:
            if existing.exists():
                break
        except OSError:  # a name too long to look up: reported below
            pass
        existing = existing.parent
    limits = {"name": 255, "path": 4096}
    try:
        limits = {"name": os.pathconf(existing, "PC_NAME_MAX"), "path": os.pathconf(existing, "PC_PATH_MAX")}
    except (OSError, ValueError, AttributeError):  # not every system reports them
        pass
    longest = max((len(os.fsencode(part)) for part in absolute.parts), default=0)
    if longest > limits["name"]:
        raise ValueError(f"{name} has a name of {longest} bytes; this filesystem allows {limits['name']} per name")
    if len(os.fsencode(str(absolute))) >= limits["path"]:
        raise ValueError(
            f"{name} is {len(os.fsencode(str(absolute)))} bytes long as an absolute path; "
            f"this filesystem allows fewer than {limits['path']}"
        )
    if not existing.is_dir():
        kind = "is a file" if existing.is_file() else "exists and is not a directory"
        if existing == absolute:
            raise ValueError(f"{name} {text[:200]!r} cannot be a directory: it {kind}")
        raise ValueError(f"{name} {text[:200]!r} cannot be a directory: its parent {str(existing)!r} {kind}")


def __getattr__(name: str) -> Any:
    # Metric averaging moved to mini_trainer.metrics; these names still import from here.
    if name in ("MetricMeans", "key_average"):
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
