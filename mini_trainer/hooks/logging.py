"""LoggingHook: every `interval` steps, average the interval's metrics and hand them to
`trainer.log()`, which fans out to every hook's `on_log` (W&B, your own...). Each record
logged through `trainer.log()` (by this hook, by an evaluation, by you) is also appended
as one JSON line to `<workspace>/metrics.jsonl` on the main process."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..builder import REGISTRY
from ..distributed import is_main_process
from ..utils import check_int
from .base import BaseHook
from .metrics import StepMetrics

if TYPE_CHECKING:
    from ..trainer import BaseTrainer


@REGISTRY.register()
class LoggingHook(BaseHook):
    """Aggregate step metrics every `interval` steps and call `trainer.log(records)`.

    Args:
        interval: steps between two `trainer.log` calls (and at the end of training).
        sync: average across distributed ranks (every rank must run this hook).
        jsonl: also append logged records to `<workspace>/metrics.jsonl` (main process only;
            nothing is written when the trainer has no workspace).
    """

    def __init__(self, interval: int = 100, sync: bool = True, jsonl: bool = True) -> None:
        check_int("LoggingHook.interval", interval, minimum=1)
        self.interval = interval
        self.sync = bool(sync)
        self.jsonl = bool(jsonl)
        self._metrics = StepMetrics()
        self._file: Any = None
        self._path: Path | None = None

    @property
    def metrics_path(self) -> Path | None:
        return self._path

    def on_before_train(self, trainer: BaseTrainer) -> None:
        self._metrics.reset()
        self._path = trainer.workspace / "metrics.jsonl" if (self.jsonl and trainer.workspace) else None

    def on_after_step(self, trainer: BaseTrainer) -> None:
        self._metrics.add(trainer.step_info)
        if trainer.step % self.interval == 0:
            self._flush(trainer)

    def on_after_train(self, trainer: BaseTrainer) -> None:
        if self._metrics.steps:
            self._flush(trainer)
        if self._file is not None:
            self._file.close()
            self._file = None

    def _flush(self, trainer: BaseTrainer) -> None:
        records = self._metrics.compute(sync=self.sync)
        self._metrics.reset()
        trainer.log(records, dry_run=not is_main_process())

    def on_log(self, trainer: BaseTrainer, records: Mapping[str, Any], dry_run: bool = False) -> None:
        if dry_run or self._path is None:
            return
        if self._file is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "a", encoding="utf-8")
        line = {"step": trainer.step, "epoch": trainer.epoch, **records}
        self._file.write(json.dumps(line, default=_jsonable, allow_nan=True) + "\n")
        self._file.flush()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # 0-d tensors / numpy scalars logged by the user
        value = value.item()
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return str(value)
