"""LoggingHook: every `interval` steps, average the interval's metrics and hand them to
`trainer.log()`, which fans out to every hook's `on_log` (W&B, your own...). Each record
logged through `trainer.log()` (by this hook, by an evaluation, by you) is also appended
as one JSON line to `<workspace>/metrics.jsonl` on the main process."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..builder import REGISTRY
from ..distributed import is_main_process
from ..metrics import StepMetrics
from ..plain import json_safe
from ..utils import check_int, in_workspace
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer


@REGISTRY.register()
class LoggingHook(BaseHook):
    """Aggregate step metrics every `interval` steps and call `trainer.log(records)`.

    Args:
        interval: steps between two `trainer.log` calls (and at the end of training).
        sync: average across distributed ranks (every rank must run this hook).
        jsonl: also append logged records to `<workspace>/metrics.jsonl` (main process only;
            nothing is written when the trainer has no workspace). Non-finite numbers are
            written as null, so every line is strict JSON.
    """

    def __init__(self, interval: int = 100, sync: bool = True, jsonl: bool = True) -> None:
        check_int("LoggingHook.interval", interval, minimum=1)
        self.interval = interval
        self.sync = bool(sync)
        self.jsonl = bool(jsonl)
        self._metrics = StepMetrics()

    def on_before_train(self, trainer: BaseTrainer) -> None:
        self._metrics.reset()

    def on_after_step(self, trainer: BaseTrainer) -> None:
        self._metrics.add(trainer.step_info)
        if trainer.step % self.interval == 0:
            self._flush(trainer)

    def on_after_train(self, trainer: BaseTrainer) -> None:
        if self._metrics.steps:
            self._flush(trainer)

    def on_exception(self, trainer: BaseTrainer, error: BaseException) -> None:
        # What the last steps before a crash did is often the most useful line of the run;
        # no collectives here: other ranks may not be logging.
        if self._metrics.steps:
            self._flush(trainer, sync=False)

    def _flush(self, trainer: BaseTrainer, sync: bool | None = None) -> None:
        records = self._metrics.compute(sync=self.sync if sync is None else sync)
        self._metrics.reset()
        trainer.log(records, dry_run=not is_main_process())

    def metrics_path(self, trainer: BaseTrainer) -> Path | None:
        """Where this hook appends logged records (None: not written)."""
        if not self.jsonl or trainer.workspace is None:
            return None  # without a workspace nothing is written (not even in the current directory)
        return in_workspace(trainer.workspace, "metrics.jsonl")

    def on_log(self, trainer: BaseTrainer, records: Mapping[str, Any], dry_run: bool = False) -> None:
        path = self.metrics_path(trainer)
        if dry_run or path is None:
            return
        line = {"step": trainer.step, "epoch": trainer.epoch, **records}
        path.parent.mkdir(parents=True, exist_ok=True)
        # Open, append, close: at most once per interval, and nothing is left open if the
        # process dies or logs again after training.
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(json_safe(line), allow_nan=False) + "\n")
