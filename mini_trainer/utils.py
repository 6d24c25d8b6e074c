"""Small helpers shared by the trainer, the hooks and user code.

- `map_nested_tensor` applies a function to every tensor inside nested containers.
- `key_average` averages nested dicts of numbers / 0-d tensors with a single host transfer.
- `unwrap` peels torch.compile, DDP/FSDP1 and AveragedModel wrappers off a model.
- `check_*` validators raise errors that name the argument, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "map_nested_tensor",
    "key_average",
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


# ---------------------------------------------------------------------------- averaging


class _MeanState:
    """Running NaN-skipping sum and count of one metric.

    Python numbers are summed on the host at once. Tensors are only appended (no kernel
    per step) and folded every `compact_every` values into device-side partial sums with
    one stack, so memory stays bounded over long runs and nothing reaches the host until
    `MetricMeans.compute`.
    """

    __slots__ = ("name", "host_sum", "host_count", "pending", "dev_sum", "dev_count")

    def __init__(self, name: str) -> None:
        self.name = name
        self.host_sum = 0.0
        self.host_count = 0
        self.pending: list[torch.Tensor] = []
        self.dev_sum: torch.Tensor | None = None
        self.dev_count: torch.Tensor | None = None

    def fold_pending(self) -> None:
        pending, self.pending = self.pending, []
        with torch.no_grad():
            values = _stack_scalars(self.name, pending).to(torch.float64)
            finite = torch.isfinite(values)
            part_sum = torch.where(finite, values, 0.0).sum()
            part_count = finite.sum()
        if self.dev_sum is None:
            self.dev_sum, self.dev_count = part_sum, part_count
        else:
            self.dev_sum = self.dev_sum + part_sum.to(self.dev_sum.device)
            self.dev_count = self.dev_count + part_count.to(self.dev_count.device)


def _stack_scalars(name: str, values: list[torch.Tensor]) -> torch.Tensor:
    """One 1-d tensor from single-element tensors (one kernel when shapes and devices agree)."""
    try:
        stacked = torch.stack(values)
        if stacked.numel() == len(values):
            return stacked.reshape(-1)
    except RuntimeError:  # mixed shapes, dtypes or devices: take the slow road
        pass
    for value in values:
        if value.numel() != 1:
            raise ValueError(
                f"record {name!r} must be a number or a single-element tensor; "
                f"got a tensor of shape {tuple(value.shape)}"
            )
    device = values[0].device
    return torch.stack([v.reshape(()).to(device=device, dtype=torch.float64) for v in values])


class MetricMeans:
    """Averages of named scalar metrics with at most one host transfer per `compute()`.

    `add(name, value)` accepts Python numbers, bools and single-element tensors; it never
    synchronises with the device. NaN and inf values are left out (an fp16 overflow step's
    inf grad norm would otherwise hide the interval's other steps); a key with no finite
    value averages to NaN. `compute(sync=True)` also averages across distributed ranks.
    """

    compact_every = 256

    def __init__(self) -> None:
        self._states: dict[str, _MeanState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def reset(self) -> None:
        self._states = {}

    def add(self, name: str, value: Any) -> None:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = _MeanState(name)
        if isinstance(value, torch.Tensor):
            state.pending.append(value)  # checked and reduced in fold_pending()
            if len(state.pending) >= self.compact_every:
                state.fold_pending()
        elif isinstance(value, (int, float)):  # bool is an int
            value = float(value)
            if math.isfinite(value):
                state.host_sum += value
                state.host_count += 1
        else:
            raise TypeError(
                f"record {name!r} must be a number or a single-element tensor; "
                f"got {type(value).__name__}: {value!r}"
            )

    def extend(self, name: str, values: list[Any]) -> None:
        """`add(name, v)` for each of `values` (one list operation for the tensors)."""
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if len(tensors) != len(values):
            for value in values:
                if not isinstance(value, torch.Tensor):
                    self.add(name, value)
        if tensors:
            state = self._states.get(name)
            if state is None:
                state = self._states[name] = _MeanState(name)
            state.pending.extend(tensors)
            if len(state.pending) >= self.compact_every:
                state.fold_pending()

    def device_mean(self, name: str) -> Any:
        """The mean of `name` as a 0-d float64 tensor on the values' device (no host sync),
        or a float when only Python numbers were added."""
        state = self._states[name]
        if state.pending:
            state.fold_pending()
        if state.dev_sum is None:
            return state.host_sum / state.host_count if state.host_count else math.nan
        return (state.dev_sum + state.host_sum) / (state.dev_count + state.host_count)

    def add_nested(self, records: Mapping, prefix: str = "") -> None:
        for name, value in flatten_dict(records, prefix=prefix).items():
            self.add(name, value)

    def compute(self, sync: bool = False) -> dict[str, float]:
        """Return `{name: mean}`; one device-to-host copy for all tensor-valued metrics."""
        names = list(self._states)
        if sync:
            from . import distributed

            names = distributed.union_of_names(names)  # a no-op in a single process
        sums: list[Any] = []
        counts: list[Any] = []
        for name in names:
            state = self._states.get(name) or _MeanState(name)
            if state.pending:
                state.fold_pending()
            sums.append(state.host_sum if state.dev_sum is None else state.dev_sum + state.host_sum)
            counts.append(state.host_count if state.dev_count is None else state.dev_count + state.host_count)
        totals = _to_host_floats(sums + counts, sync)
        n = len(names)
        return {
            name: (totals[i] / totals[n + i]) if totals[n + i] > 0 else math.nan
            for i, name in enumerate(names)
        }


def _to_host_floats(values: list[Any], sync: bool) -> list[float]:
    """Python numbers and 0-d tensors -> floats with one stack of the tensors, one transfer
    to the host and, when syncing across ranks, one all-reduce of everything."""
    from . import distributed

    sync = sync and distributed.is_distributed()
    at = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    floats = [0.0 if isinstance(v, torch.Tensor) else float(v) for v in values]
    tensors = None
    if at:
        device = values[at[0]].device
        tensors = torch.stack([values[i].to(device=device, dtype=torch.float64) for i in at])
    if sync:
        everything = torch.tensor(floats, dtype=torch.float64, device=distributed.collective_device())
        if tensors is not None:
            everything[at] = tensors.to(everything.device)
        return distributed.all_reduce_sum(everything).tolist()
    if tensors is not None:
        for i, value in zip(at, tensors.tolist()):
            floats[i] = value
    return floats


def key_average(records: Sequence[Mapping] | Iterable[Mapping], sync: bool = False) -> dict[str, Any]:
    """Average nested dicts key by key.

    A key missing from some dicts is averaged over the dicts that have it; NaN and inf
    values are ignored (no finite value gives NaN). Values may be Python numbers or single-element tensors;
    all tensors are brought to the host in one transfer.

    >>> key_average([{"loss": 0.5, "m": {"acc": 0.9}}, {"loss": 0.6, "m": {"acc": 0.85}}])
    {'loss': 0.55, 'm': {'acc': 0.875}}
    """
    means = MetricMeans()
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise TypeError(f"key_average: records[{i}] must be a dict; got {type(record).__name__}")
        means.add_nested(record)
    return unflatten_dict({k: _round_float(v) for k, v in means.compute(sync=sync).items()})


def _round_float(value: float) -> float:
    # float64 averaging of float32 inputs: trim the last bits so 0.55 prints as 0.55.
    return float(f"{value:.12g}") if math.isfinite(value) else value


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
        allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (f" <= {maximum}" if maximum is not None else "")
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
        raise ValueError(f"{name} is {len(os.fsencode(str(absolute)))} bytes long as an absolute path; this filesystem allows fewer than {limits['path']}")
    if not existing.is_dir():
        kind = "is a file" if existing.is_file() else "exists and is not a directory"
        if existing == absolute:
            raise ValueError(f"{name} {text[:200]!r} cannot be a directory: it {kind}")
        raise ValueError(f"{name} {text[:200]!r} cannot be a directory: its parent {str(existing)!r} {kind}")
