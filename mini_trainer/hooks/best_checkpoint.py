"""The best checkpoint by an evaluation result: what `CheckpointingHook(keep_best=...)`
keeps. After each evaluation (`step_info["eval"]`, from `EvalHook`) the monitored value is
compared with the best so far; a new best is saved at once, `<root>/best` is pointed at it
(atomically, like `latest`), pruning never removes it, and its manifest records the
metric, the mode and the value. The best value is part of the hook's checkpointed state,
so it survives a resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import checkpoint, distributed
from ..plain import json_safe
from .evaluation import EvalHook, MetricMonitor, evaluation_results

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

logger = logging.getLogger("mini_trainer")

#: where the best value lives in `state_dict()["hooks"]`
STATE_KEY = "checkpointing"


class BestCheckpoint:
    """Tracks `monitor` ("min" or "max" `mode`) for a checkpoint directory."""

    def __init__(self, monitor: str, mode: str) -> None:
        self.tracker = MetricMonitor("CheckpointingHook.keep_best", monitor, mode)

    def check_hooks(self, trainer: BaseTrainer) -> None:
        if not any(isinstance(h, EvalHook) for h in trainer.hooks):
            raise ValueError(f"CheckpointingHook(keep_best={self.tracker.monitor!r}) needs an EvalHook among the "
                             "trainer's hooks: nothing else evaluates during training")

    def judge(self, trainer: BaseTrainer) -> bool:
        """Whether this step's evaluation (if one ran and was not judged yet) is a new best."""
        observed = self.tracker.observe(trainer)
        return observed is not None and observed[1]

    def is_best(self, step: int) -> bool:
        return self.tracker.best_step == step

    def manifest_entry(self) -> dict[str, Any]:
        """What the best checkpoint's manifest records."""
        tracker = self.tracker
        return {"best": json_safe({"metric": tracker.monitor, "mode": tracker.mode, "value": tracker.best})}

    def state(self) -> dict[str, Any]:
        return self.tracker.state()

    def restore(self, state_dict: Any) -> None:
        self.tracker.restore((state_dict.get("hooks") or {}).get(STATE_KEY), f"hooks.{STATE_KEY}")

    def forget(self) -> None:
        """Start over (resuming from another run's checkpoint: its best is not in this directory)."""
        self.tracker.best = self.tracker.best_step = None

    def reconcile(self, root: Path) -> None:
        """After a resume (every rank calls it), point `best` at the best checkpoint of the
        resumed state: a resume that fell back past a damaged checkpoint may find it naming a
        later step. When that checkpoint is gone, every rank forgets the best (rank 0 decides:
        ranks that disagreed would save at different evaluations and wait for each other)."""
        step = self.tracker.best_step
        expected = root / checkpoint.checkpoint_name(step) if step is not None else None
        main = distributed.is_main_process()
        gone = main and expected is not None and not (expected / checkpoint.MANIFEST).is_file()
        if distributed.broadcast_object(gone):
            if main:
                logger.warning("the best checkpoint (%s, %s = %s) is gone; `best` will name the next best one",
                               expected, self.tracker.monitor, self.tracker.best)
            self.forget()
            expected = None
        if main and checkpoint.read_pointer(root, checkpoint.BEST) != expected:
            checkpoint.write_pointer(root, checkpoint.BEST, expected)


def step_metrics(trainer: BaseTrainer) -> dict[str, Any]:
    """The manifest entry for this step's evaluation results (NaN as null; none: nothing)."""
    results = evaluation_results(trainer)
    return {"metrics": json_safe(dict(results))} if results else {}
