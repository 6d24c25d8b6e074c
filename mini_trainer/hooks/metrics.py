"""Interval bookkeeping shared by ProgressHook and LoggingHook: collect each step's
`step_info` without touching the host, then reduce it all in one transfer."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..utils import MetricMeans, unflatten_dict

#: step_info entries averaged over an interval (others are ignored).
STEP_KEYS = ("loss", "grad_norm", "data_time", "step_time", "retries")


class StepMetrics:
    """Averages of the built-in step metrics and the user's records since `reset()`."""

    def __init__(self) -> None:
        self.means = MetricMeans()
        self.steps = 0
        self.started = time.perf_counter()
        self.lr: Any = None

    def reset(self) -> None:
        self.means.reset()
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, step_info: Mapping[str, Any]) -> None:
        add = self.means.add
        for key in STEP_KEYS:
            value = step_info.get(key)
            if value is not None:
                add(key, value)
        records = step_info.get("records")
        if records:
            self.means.add_nested(records)
        self.lr = step_info.get("lr", self.lr)
        self.steps += 1

    def compute(self, sync: bool = False) -> dict[str, Any]:
        """Nested `{name: mean}`, plus `lr` (the latest value) and `wall_time` per step."""
        values = unflatten_dict(self.means.compute(sync=sync))
        if self.lr is not None:
            values["lr"] = float(self.lr)
        if self.steps:
            values["wall_time"] = (time.perf_counter() - self.started) / self.steps
        return values
