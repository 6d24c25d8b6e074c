"""CsvLoggerHook: the records of `trainer.log()` as a spreadsheet, one row per logged
step, on the main process. See docs/logging.md."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..builder import REGISTRY
from ..checkpoint import write_file
from ..distributed import is_main_process
from ..plain import to_plain
from ..utils import flatten_dict, run_file
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

logger = logging.getLogger("mini_trainer")

_FIXED = ("step", "epoch")


@REGISTRY.register()
class CsvLoggerHook(BaseHook):
    """Write the records of `trainer.log()` (LoggingHook's interval averages, evaluation
    results, your own) to a CSV file: one row per logged step.

    Args:
        path: the CSV file. None: `<workspace>/metrics.csv`; a relative path is taken inside
            `trainer.workspace` (without a workspace: the current directory). With neither a
            workspace nor a `path`, training stops at its start with a ValueError.

    Layout: the columns are `step`, `epoch`, then the metric names in the order they first
    appeared; nested records are flattened with "." (`{"m": {"acc": 1}}` -> `m.acc`).
    Records named `step` or `epoch` are not written (those columns hold the trainer's).

    - Several `trainer.log()` calls at the same step (the interval average and an
      evaluation) become one row; a name logged twice at one step keeps the later value.
      During training a row is written at the end of its step (after the hooks that log in
      `on_after_step`, before the checkpoint is saved) and when training ends or fails;
      outside training (an evaluation before `train()`, the test results the CLI logs
      after it) at once. A log for a step that already has a row (the final evaluation at
      the last training step) is merged into that row.
    - When a record brings a new name, the header grows: the whole file is rewritten with
      the new column (earlier rows have an empty cell there). Rewrites go through a
      temporary file renamed into place, so a reader or a killed process sees the old file
      or the new one, never half of it. Otherwise a row is appended with one write.
    - Resume: when training starts, rows for steps after `trainer.step` (the step the
      checkpointing hook restored; 0 for a fresh run) are dropped, since the run logs those
      steps again; the header is kept. A torn last line (a process killed while appending)
      is dropped too.
    - Values: numbers as Python's `csv` writes them (`str()`), so NaN and infinity become
      `nan`, `inf`, `-inf` (`float()` reads them back; pandas too); 0-d tensors as their
      number; anything else as its `str()`. A name not logged at a step is an empty cell.

    Only the main process writes, and nothing is written for a `dry_run` call.
    """

    # Write a step's row after the hooks that log in on_after_step (LoggingHook: 0) and
    # before the checkpoint of that step is saved (CheckpointingHook: 100), so a resumed run
    # finds the rows up to its checkpoint on disk; at the end, after LoggingHook's last flush.
    priority = {"on_after_step": 95, "on_after_train": 95, "on_exception": 95, "default": 0}

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"CsvLoggerHook.path must be a str, a Path or None; got {type(path).__name__} {path!r}")
        if path is not None and not os.fspath(path):
            raise ValueError("CsvLoggerHook.path must not be empty (None: <workspace>/metrics.csv)")
        self.path = Path(path) if path is not None else None
        self._file: Path | None = None  # the file the state below describes
        self._columns: list[str] = list(_FIXED)
        self._steps: set[int] = set()  # steps that have a row in the file
        self._pending: dict[str, Any] | None = None  # the current step's row, not written yet
        self._training = False

    def file_path(self, trainer: BaseTrainer) -> Path:
        """Where the rows go; a ValueError when there is nowhere to write."""
        return run_file("CsvLoggerHook.path", self.path, trainer.workspace, "metrics.csv")

    # ------------------------------------------------------------------ events

    def on_before_train(self, trainer: BaseTrainer) -> None:
        path = self.file_path(trainer)  # on every rank: a config mistake stops them all
        self._training = True
        if is_main_process():
            self._write_pending()
            # The steps after the restored one will be logged again by this run.
            self._open(path, drop_after=trainer.step)

    def on_log(self, trainer: BaseTrainer, records: Mapping[str, Any], dry_run: bool = False) -> None:
        if dry_run or not is_main_process():
            return
        values = {
            name: to_plain(value) for name, value in flatten_dict(records).items() if name not in _FIXED
        }
        if not values:
            return
        path = self.file_path(trainer)
        if self._file != path:
            self._write_pending()
            self._open(path)
        if self._pending is not None and self._pending["step"] != trainer.step:
            self._write_pending()
        if self._pending is None:
            self._pending = {"step": trainer.step, "epoch": trainer.epoch}
        self._pending.update(values)
        if not self._training:  # nothing later in this run is sure to write it
            self._write_pending()

    def on_after_step(self, trainer: BaseTrainer) -> None:
        self._write_pending()

    def on_after_train(self, trainer: BaseTrainer) -> None:
        self._training = False
        self._write_pending()

    def on_exception(self, trainer: BaseTrainer, error: BaseException) -> None:
        self._training = False
        self._write_pending()

    # ------------------------------------------------------------------ the file

    def _open(self, path: Path, drop_after: int | None = None) -> None:
        """Take `path` as the file to write: its header and steps, if it exists. A torn last
        line, and rows for steps after `drop_after`, are removed from the file."""
        self._file = path
        header, rows, torn = self._read()
        self._columns = header or list(_FIXED)
        kept = rows if drop_after is None else [row for row in rows if _step_of(row) <= drop_after]
        if torn or len(kept) < len(rows):
            logger.info(
                "CsvLoggerHook: %s: dropped %d row(s) after step %s%s", path, len(rows) - len(kept), drop_after,
                " and a torn last line" if torn else "",
            )
            self._rewrite(kept)  # also before any append: a new row must not continue a torn line
        self._steps = {_step_of(row) for row in kept}

    def _read(self) -> tuple[list[str], list[dict[str, str]], bool]:
        """(header, rows, whether a torn last line was left out) of the file; empty if absent."""
        assert self._file is not None
        try:
            text = self._file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return [], [], False
        torn = bool(text) and not text.endswith("\n")
        if torn:
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = list(reader.fieldnames or [])
        if header and tuple(header[:2]) != _FIXED:
            raise ValueError(
                f"CsvLoggerHook: {str(self._file)!r} exists but is not a metrics file (its columns start with "
                f"{header[:2]!r}, not 'step', 'epoch'): pass another path or move it away"
            )
        rows = []
        for row in reader:
            try:
                _step_of(row)
            except (TypeError, ValueError):
                logger.warning("CsvLoggerHook: %s: skipping a row without a step: %r", self._file, row)
                continue
            rows.append({name: value if value is not None else "" for name, value in row.items() if name})
        return header, rows, torn

    def _write_pending(self) -> None:
        row, self._pending = self._pending, None
        if row is None:
            return
        assert self._file is not None
        new_columns = [name for name in row if name not in self._columns]
        self._columns.extend(new_columns)
        if row["step"] in self._steps:
            # A step that already has a row (an evaluation logged after training): merge.
            _, rows, _ = self._read()
            matching = [old for old in rows if _step_of(old) == row["step"]]
            for old in matching:
                old.update({name: value for name, value in row.items() if name != "epoch"})
            self._rewrite(rows if matching else [*rows, row])  # not found: the file was changed behind our back
        elif new_columns or not self._file.exists():
            _, rows, _ = self._read()
            self._rewrite([*rows, row])
        else:
            # Opened per row, not held: a rewrite replaces the file (an open handle would
            # keep writing to the old one), and nothing is left open when the process dies.
            with open(self._file, "a", encoding="utf-8", newline="") as file:
                file.write(_csv_text([row], self._columns, header=False))  # one write: a whole line or a torn one
                file.flush()
        self._steps.add(row["step"])

    def _rewrite(self, rows: Iterable[Mapping[str, Any]]) -> None:
        assert self._file is not None
        self._file.parent.mkdir(parents=True, exist_ok=True)
        # Temporary file in the same directory, flushed and fsynced, renamed over the old one.
        write_file(self._file, _csv_text(rows, self._columns, header=True), fsync=True, atomic=True)


def _step_of(row: Mapping[str, Any]) -> int:
    return int(row["step"])


def _csv_text(rows: Iterable[Mapping[str, Any]], columns: list[str], *, header: bool) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
