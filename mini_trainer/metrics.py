"""Metric averaging: what the trainer, the hooks and `fit()` report.

- `MetricMeans`: running NaN-skipping means of named scalars, with at most one host
  transfer (and, distributed, one all-reduce) per `compute()`.
- `key_average`: averages of nested dicts of numbers / 0-d tensors, one host transfer.
- `StepMetrics`: an interval's worth of `trainer.step_info`, kept by reference (no tensor
  work in the step) and reduced with one stack per metric; it also derives the interval's
  throughput (`samples_per_s`, `tokens_per_s`, `mfu`: see docs/throughput.md).
- `average_records` / `mean_loss`: a step's micro-step records and losses, on the device
  (a `tokens` record is a count: summed over the micro-steps, not averaged).
- `check_forward_output`: what `forward` must return, checked with errors that say the fix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .utils import flatten_dict, map_nested_tensor, unflatten_dict

__all__ = [
    "ForwardOutput",
    "LATEST_KEYS",
    "RATE_KEYS",
    "RESERVED_NAMES",
    "STEP_KEYS",
    "SUMMED_RECORDS",
    "MetricMeans",
    "StepMetrics",
    "average_records",
    "check_forward_output",
    "count_samples",
    "key_average",
    "mean_loss",
    "to_host_floats",
]

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
        total, state = self.device_sum(name), self._states[name]
        if state.dev_count is None:
            return total / state.host_count if state.host_count else math.nan
        return total / (state.dev_count + state.host_count)

    def device_sum(self, name: str) -> Any:
        """The sum of the finite values of `name`, like `device_mean` (no host sync)."""
        state = self._states[name]
        if state.pending:
            state.fold_pending()
        return state.host_sum if state.dev_sum is None else state.dev_sum + state.host_sum

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
        totals = to_host_floats(sums + counts, sync)
        n = len(names)
        return {
            name: (totals[i] / totals[n + i]) if totals[n + i] > 0 else math.nan
            for i, name in enumerate(names)
        }


def to_host_floats(values: list[Any], sync: bool) -> list[float]:
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
        for i, value in zip(at, tensors.tolist(), strict=True):
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


#: What `BaseTrainer.forward` returns: a scalar loss (or None) and a dict of records.
ForwardOutput = tuple["torch.Tensor | None", Mapping[str, Any]]

#: step_info entries averaged over an interval (others, e.g. an evaluation's "eval", are
#: ignored). `samples`: this rank's samples in the step (every micro-batch); `flops`: the
#: step's FLOPs on this device, set by `MfuHook`.
STEP_KEYS = ("loss", "grad_norm", "data_time", "step_time", "retries", "samples", "flops")

#: step_info entries reported as their latest value in an interval (a rate, a running peak,
#: the device's peak FLOP/s).
LATEST_KEYS = ("lr", "max_memory", "max_rss", "peak_flops")

#: What `StepMetrics.compute` derives from the above and the `tokens` record.
RATE_KEYS = ("samples_per_s", "tokens_per_s", "mfu")

#: Records that are counts, not means: summed over a step's micro-steps by `average_records`
#: (then averaged over steps like any record). `tokens` stays a name `forward` may return.
SUMMED_RECORDS = frozenset({"tokens"})

#: Names the trainer and these reports use themselves; user records may not take them.
RESERVED_NAMES = frozenset({*STEP_KEYS, *LATEST_KEYS, *RATE_KEYS, "wall_time", "micro_steps", "skipped"})


class StepMetrics:
    """Averages of the built-in step metrics and the user's records since `reset()`."""

    #: steps kept by reference before they are folded into running sums
    fold_every = 256

    def __init__(self) -> None:
        self.means = MetricMeans()
        self.steps = 0
        self.started = time.perf_counter()
        self.latest: dict[str, Any] = {}
        self._infos: list[Mapping[str, Any]] = []

    def reset(self) -> None:
        self.means.reset()
        self._infos = []
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, step_info: Mapping[str, Any]) -> None:
        self._infos.append(step_info)
        self.steps += 1
        if len(self._infos) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        infos, self._infos = self._infos, []
        for key in STEP_KEYS:
            values = [info[key] for info in infos if info.get(key) is not None]
            if values:
                self.means.extend(key, values)
        columns: dict[str, list[Any]] = {}
        for info in infos:
            records = info.get("records")
            if not records:
                continue
            if any(isinstance(v, Mapping) for v in records.values()):
                records = flatten_dict(records)
            for name, value in records.items():
                columns.setdefault(name, []).append(value)
        for name, values in columns.items():
            self.means.extend(name, values)
        if infos:
            for key in LATEST_KEYS:
                value = infos[-1].get(key)
                if value is not None:
                    self.latest[key] = value

    def compute(self, sync: bool = False) -> dict[str, Any]:
        """Nested `{name: mean}`, plus the latest `lr` (and peak memory when a memory hook
        reports it), `wall_time` (seconds per step over the interval) and the throughput:

        - `samples_per_s`: mean samples per step x world size / `wall_time`: all ranks
          together. With `sync=True` the mean is over every rank's steps; without, this
          rank's figure stands for each rank's.
        - `tokens_per_s`: the same from the `tokens` record, when `forward` returns one.
        - `mfu`: mean `flops` per step / `wall_time` / `peak_flops`: per device (the
          average over devices with `sync=True`), when `MfuHook` runs.

        A rate is left out when its count is missing, not finite or not positive (e.g. a
        batch whose size the trainer could not read). Derived from the sums already kept:
        no other device read or collective than the one of `MetricMeans.compute`."""
        self._fold()
        values = unflatten_dict(self.means.compute(sync=sync))
        for key, value in self.latest.items():
            values[key] = float(value)
        if self.steps:
            values["wall_time"] = (time.perf_counter() - self.started) / self.steps
            values.update(_rates(values, values["wall_time"]))
        return values


def _rates(values: Mapping[str, Any], wall_time: float) -> dict[str, float]:
    """`samples_per_s`, `tokens_per_s` and `mfu` from an interval's means (see `StepMetrics.compute`)."""
    from .distributed import get_world_size

    def positive(key: str) -> float | None:
        value = values.get(key)  # a nested dict (records under "tokens") is not a count
        return value if isinstance(value, float) and math.isfinite(value) and value > 0 else None

    if not wall_time > 0:
        return {}
    rates: dict[str, float] = {}
    world = get_world_size()
    for count, rate in (("samples", "samples_per_s"), ("tokens", "tokens_per_s")):
        per_step = positive(count)
        if per_step is not None:
            rates[rate] = per_step * world / wall_time
    flops, peak = values.get("flops"), positive("peak_flops")
    if isinstance(flops, float) and math.isfinite(flops) and peak is not None:
        rates["mfu"] = flops / wall_time / peak
    return rates


def count_samples(batch: Any) -> int:
    """The number of samples in `batch`: the first dimension of its first tensor (inside
    dicts, lists, tuples), read from the shape on the host (no device sync). 0 when the
    batch holds no tensor with a dimension."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 0
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = count_samples(value)
        if found:
            return found
    return 0


def mean_loss(losses: list[torch.Tensor]) -> torch.Tensor | None:
    """The mean of a step's micro-step losses, on the device (None when none ran)."""
    if not losses:
        return None
    if len(losses) == 1:
        return losses[0]
    return torch.stack([loss.float() for loss in losses]).mean()


def average_records(all_records: list[Mapping[str, Any]]) -> Mapping[str, Any]:
    """A step's micro-step records averaged key by key (NaN/inf skipped), on the device.
    Counts (`SUMMED_RECORDS`: a top-level `tokens`) are summed instead: the step's tokens
    are those of all its micro-batches."""
    if len(all_records) == 1:
        return all_records[0]
    columns: dict[str, list[Any]] = {}
    for records in all_records:
        for key, value in flatten_dict(records).items():
            columns.setdefault(key, []).append(value)
    averaged: dict[str, Any] = {}
    for key, values in columns.items():
        means = MetricMeans()
        means.extend(key, values)
        averaged[key] = means.device_sum(key) if key in SUMMED_RECORDS else means.device_mean(key)
    return unflatten_dict(averaged)


def check_forward_output(out: Any, owner: str) -> tuple[torch.Tensor | None, Mapping[str, Any]]:
    """`(loss, records)` from what `owner.forward` returned, or an error that says the fix.
    Records that hold autograd graphs are detached: hooks keep them for a whole interval."""
    if not isinstance(out, tuple) or len(out) != 2:
        got = f"a tuple of length {len(out)}" if isinstance(out, tuple) else type(out).__name__
        raise TypeError(
            f"{owner}.forward must return a tuple (loss, records) with loss a "
            f"scalar tensor or None and records a dict; got {got}"
        )
    loss, records = out
    if loss is not None:
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"forward returned a loss of type {type(loss).__name__}; it must be a scalar tensor or None"
            )
        if loss.ndim != 0:
            raise ValueError(
                f"forward returned a loss of shape {tuple(loss.shape)}; it must be a scalar "
                "(0-d) tensor: reduce it, e.g. loss.mean()"
            )
    if not records:
        return loss, {}
    if not isinstance(records, Mapping):
        raise TypeError(f"forward returned records of type {type(records).__name__}; they must be a dict")
    if not RESERVED_NAMES.isdisjoint(records):
        clash = sorted(RESERVED_NAMES.intersection(records))
        raise ValueError(
            f"forward returned records named {clash}: these names are the trainer's own step metrics; rename them"
        )
    if any(isinstance(v, torch.Tensor) and v.requires_grad or isinstance(v, Mapping) for v in records.values()):
        records = map_nested_tensor(torch.Tensor.detach, records)
    return loss, records
