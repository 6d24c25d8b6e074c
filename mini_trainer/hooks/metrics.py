"""Interval bookkeeping shared by ProgressHook, LoggingHook and `fit()`: keep each step's
`step_info` by reference (no tensor work in the step), then reduce an interval's worth
with one stack per metric and a single host transfer."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..utils import MetricMeans, flatten_dict, unflatten_dict

#: step_info entries averaged over an interval (others are ignored).
STEP_KEYS = ("loss", "grad_norm", "data_time", "step_time", "retries")

#: step_info entries reported as their latest value in an interval (a rate, a running peak).
LATEST_KEYS = ("lr", "max_memory", "max_rss")

#: Names the trainer and these reports use themselves; user records may not take them.
RESERVED_NAMES = frozenset({*STEP_KEYS, *LATEST_KEYS, "wall_time", "micro_steps", "skipped"})


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
        reports it) and `wall_time` per step."""
        self._fold()
        values = unflatten_dict(self.means.compute(sync=sync))
        for key, value in self.latest.items():
            values[key] = float(value)
        if self.steps:
            values["wall_time"] = (time.perf_counter() - self.started) / self.steps
        return values
