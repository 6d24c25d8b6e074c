"""TensorBoardHook: write every `trainer.log()` record as TensorBoard scalars, on the main
process, at the trainer's step. Needs the `tensorboard` package:
`pip install 'mini_trainer[tensorboard]'` (imported only when training starts or a record
is logged, never when this module is imported)."""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..builder import REGISTRY
from ..distributed import is_main_process
from ..plain import to_plain
from ..utils import flatten_dict, run_file
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

logger = logging.getLogger("mini_trainer")

_INSTALL_HINT = "TensorBoardHook needs the tensorboard package: pip install 'mini_trainer[tensorboard]'"


@REGISTRY.register()
class TensorBoardHook(BaseHook):
    """Write the records of `trainer.log()` (LoggingHook's interval averages, evaluation
    results, your own) as TensorBoard scalars at `global_step=trainer.step`.

    Args:
        log_dir: the directory of the event files. None: `<workspace>/tensorboard`; a
            relative path is taken inside `trainer.workspace` (without a workspace: the
            current directory). With neither a workspace nor a `log_dir`, training stops at
            its start with a ValueError.

    Names: nested records are flattened with "." (`{"m": {"acc": 1}}` -> `m.acc`), the
    names `metrics.jsonl` and `metrics.csv` use; a "/" in a name (`val/loss`) is kept, so
    TensorBoard groups those scalars under `val`. Numbers (Python numbers, 0-d tensors,
    numpy scalars; booleans as 0/1) are written; anything else (strings, lists) is skipped,
    with one warning per name. Non-finite values are written as they are: TensorBoard
    shows NaN and infinity points, which is usually what one wants to see when a loss blows up.

    Only the main process writes, and nothing is written for a `dry_run` call (every rank
    still checks at the start of training that tensorboard can be imported, so a missing
    package stops all ranks alike).

    Resume: the writer is opened with `purge_step=trainer.step + 1` (the step restored by
    the checkpointing hook, which runs first). TensorBoard then hides the events a killed
    run wrote after its last checkpoint, which the resumed run writes again; the events at
    the checkpoint's own step were logged before it was saved and are kept. A fresh run
    (step 0) in a directory that holds an older run's events hides them the same way, from
    step 1 on.

    Files: one writer (one event file) per training; it is flushed and closed when training
    ends or fails. A record logged outside training (an evaluation before `train()`, the
    test results the CLI logs after it) is written through a writer of its own, opened
    and closed for that call, so it is on disk when `trainer.log()` returns.
    """

    # Close after every other hook logged its last records (LoggingHook flushes in
    # on_after_train / on_exception at priority 0); open after the checkpoint restore
    # (priority -100), so purge_step is the restored step.
    priority = {"on_after_train": 90, "on_exception": 90, "default": 0}

    def __init__(self, log_dir: str | os.PathLike | None = None) -> None:
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(
                f"TensorBoardHook.log_dir must be a str, a Path or None; got {type(log_dir).__name__} {log_dir!r}"
            )
        if log_dir is not None and not os.fspath(log_dir):
            raise ValueError("TensorBoardHook.log_dir must not be empty (None: <workspace>/tensorboard)")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.writer: Any = None  # the SummaryWriter while training runs (main process only)
        self._warned: set[str] = set()

    def directory(self, trainer: BaseTrainer) -> Path:
        """Where the event files go; a ValueError when there is nowhere to write."""
        return run_file("TensorBoardHook.log_dir", self.log_dir, trainer.workspace, "tensorboard")

    # ------------------------------------------------------------------ events

    def on_before_train(self, trainer: BaseTrainer) -> None:
        directory = self.directory(trainer)  # on every rank: a config mistake stops them all
        summary_writer = _summary_writer_class()
        self._close()  # a writer left by an earlier train() that did not end (cannot happen normally)
        if is_main_process():
            # Steps up to the restored one are final; later ones will be written again.
            self.writer = summary_writer(log_dir=str(directory), purge_step=trainer.step + 1)

    def on_log(self, trainer: BaseTrainer, records: Mapping[str, Any], dry_run: bool = False) -> None:
        if dry_run or not is_main_process():
            return
        scalars = self._scalars(records)
        if not scalars:
            return
        if self.writer is not None:
            self._write(self.writer, scalars, trainer.step)
            return
        # Outside training: a writer for this call only, closed (so flushed) before returning,
        # as nothing later is sure to close it.
        writer = _summary_writer_class()(log_dir=str(self.directory(trainer)))
        try:
            self._write(writer, scalars, trainer.step)
        finally:
            writer.close()

    def on_after_train(self, trainer: BaseTrainer) -> None:
        self._close()

    def on_exception(self, trainer: BaseTrainer, error: BaseException) -> None:
        try:
            self._close()
        except Exception as close_error:  # noqa: BLE001 - the training error is the one to raise
            logger.error("TensorBoardHook: could not close the event file: %s", close_error)

    # ------------------------------------------------------------------ helpers

    def _scalars(self, records: Mapping[str, Any]) -> dict[str, float]:
        scalars: dict[str, float] = {}
        for name, value in flatten_dict(records).items():
            value = to_plain(value)
            if isinstance(value, numbers.Real):
                scalars[name] = float(value)
            elif name not in self._warned:
                self._warned.add(name)
                logger.warning(
                    "TensorBoardHook: %r is not a number (%s), so it is not written", name, type(value).__name__
                )
        return scalars

    @staticmethod
    def _write(writer: Any, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
            # NaN and infinity are written as they are: a curve that blows up should show it.
            writer.add_scalar(name, value, global_step=step)

    def _close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.flush()
            writer.close()


def _summary_writer_class() -> Any:
    """torch's SummaryWriter, or an ImportError that says which extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch raises it when tensorboard is missing or too old
        raise ImportError(f"{_INSTALL_HINT} ({error})") from error
    return SummaryWriter
