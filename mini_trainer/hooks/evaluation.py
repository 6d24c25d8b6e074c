"""Evaluation during training: `EvalHook` runs `trainer.evaluate()` on a schedule, and
`EarlyStoppingHook` ends the run when a monitored result stops improving.

The results of an evaluation go into `trainer.step_info["eval"]` for that step (what
`CheckpointingHook(keep_best=...)`, `EarlyStoppingHook` and `ProgressHook` read) and through
`trainer.log()` (metrics.jsonl, W&B, TensorBoard, CSV). The schedule depends only on the
step and the epochs completed, and what was already evaluated is saved in checkpoints: a
resumed run evaluates at exactly the steps the uninterrupted run would have.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..builder import REGISTRY
from ..distributed import is_main_process
from ..utils import check_choice, check_flag, check_int, check_number
from .base import BaseHook
from .ema import EmaHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

logger = logging.getLogger("mini_trainer")

__all__ = ["EarlyStoppingHook", "EvalHook", "MetricMonitor", "evaluation_results"]


def evaluation_results(trainer: BaseTrainer) -> Mapping[str, float] | None:
    """The results of an evaluation at this step (`step_info["eval"]`), or None."""
    return trainer.step_info.get("eval")


@REGISTRY.register()
class EvalHook(BaseHook):
    """Evaluate `trainer.eval_loaders` during training (every rank must run it).

    Args:
        interval: evaluate after every step that is a multiple of this (None: not by steps).
        every_epoch: evaluate after the step that completes each epoch (for a loader without
            a length, the step in which the next epoch started: only then is the end known).
        at_end: evaluate when training ends, unless that step was just evaluated.
        ema: also score the weights of the `EmaHook` (True) or of the EmaHook with this
            name; its results are named `ema_<split>/<metric>`.
        splits: the splits to score (default: all of `eval_loaders`), e.g. ["val"] to keep
            a test split for the very end.
        name: key of this hook's state in checkpoints (two EvalHooks, e.g. one per split on
            different schedules, need two names; their results at one step are merged).
    """

    # After EmaHook (1) updated the average; before EarlyStoppingHook (6), ProgressHook (10)
    # and the checkpointing hook (100), which read the results of this step.
    priority = 5

    def __init__(
        self,
        interval: int | None = None,
        every_epoch: bool = False,
        at_end: bool = True,
        ema: bool | str = False,
        splits: Sequence[str] | None = None,
        name: str = "eval",
    ) -> None:
        check_int("EvalHook.interval", interval, minimum=1, allow_none=True)
        if not isinstance(name, str) or not name:
            raise TypeError(f"EvalHook.name must be a non-empty string; got {name!r}")
        check_flag("EvalHook.every_epoch", every_epoch)
        check_flag("EvalHook.at_end", at_end)
        if not isinstance(ema, (bool, str)):
            raise TypeError(f"EvalHook.ema must be True, False or an EmaHook name; got {type(ema).__name__} {ema!r}")
        if splits is not None and (isinstance(splits, str) or not all(isinstance(s, str) for s in splits)):
            raise TypeError(f"EvalHook.splits must be a list of split names or None; got {splits!r}")
        if interval is None and not every_epoch and not at_end:
            raise ValueError("EvalHook would never evaluate: set interval, every_epoch=True or at_end=True")
        self.interval, self.every_epoch, self.at_end, self.ema = interval, every_epoch, at_end, ema
        self.splits = list(splits) if splits is not None else None
        self.name = name
        self.last_step: int | None = None  # the step of the latest evaluation
        self.epochs_evaluated: int | None = None  # completed epochs already evaluated
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, results) of this process's evaluations
        self._ema_hook: EmaHook | None = None

    def on_before_train(self, trainer: BaseTrainer) -> None:
        if sum(isinstance(h, EvalHook) and h.name == self.name for h in trainer.hooks) > 1:
            raise ValueError(f"two EvalHooks are named {self.name!r}: give each its own name= (their state in "
                             "checkpoints is kept under it)")
        if not trainer.eval_loaders:
            raise ValueError("EvalHook: the trainer has no eval_loaders to evaluate; pass eval_loaders=... "
                             "(a loader or {'val': loader, ...}) or override build_eval_loaders()")
        unknown = [s for s in self.splits or [] if s not in trainer.eval_loaders]
        if unknown:
            raise ValueError(f"EvalHook.splits: {unknown} not in the trainer's eval_loaders "
                             f"(splits: {', '.join(trainer.eval_loaders)})")
        if self.ema is not False:
            self._ema_hook = self._find_ema_hook(trainer)
        if self.epochs_evaluated is None:  # a fresh run (a resumed one restored it)
            self.epochs_evaluated = _completed_epochs(trainer)

    def _find_ema_hook(self, trainer: BaseTrainer) -> EmaHook:
        found = [h for h in trainer.hooks if isinstance(h, EmaHook) and (self.ema is True or h.name == self.ema)]
        if not found:
            names = [h.name for h in trainer.hooks if isinstance(h, EmaHook)]
            raise ValueError(f"EvalHook.ema={self.ema!r}: no such EmaHook among the trainer's hooks "
                             f"(EmaHooks: {names or 'none'})")
        return found[0]

    def on_after_step(self, trainer: BaseTrainer) -> None:
        by_steps = self.interval is not None and trainer.step % self.interval == 0
        completed = _completed_epochs(trainer)
        by_epoch = self.every_epoch and completed > (self.epochs_evaluated or 0)
        if by_steps or by_epoch:
            self.epochs_evaluated = completed
            self.evaluate(trainer)

    def on_after_train(self, trainer: BaseTrainer) -> None:
        if self.at_end and self.last_step != trainer.step:
            self.evaluate(trainer)

    def evaluate(self, trainer: BaseTrainer) -> dict[str, float]:
        """Evaluate now, put the results into `step_info["eval"]` and log them."""
        loaders = {s: trainer.eval_loaders[s] for s in self.splits} if self.splits else None
        results = trainer.evaluate(loaders)
        if self._ema_hook is not None and self._ema_hook.ema_model is not None:
            ema = trainer.evaluate(loaders, model=self._ema_hook.ema_model)
            results.update({f"ema_{name}": value for name, value in ema.items()})
        earlier = evaluation_results(trainer)  # another EvalHook's, at this step
        trainer.step_info["eval"] = {**earlier, **results} if earlier else results
        self.last_step = trainer.step
        self.history.append((trainer.step, results))
        trainer.log(results, dry_run=not is_main_process())
        return results

    def on_state_dict(self, trainer: BaseTrainer, state_dict: dict[str, Any]) -> None:
        state_dict["hooks"][self.name] = {"last_step": self.last_step, "epochs_evaluated": self.epochs_evaluated}

    def on_load_state_dict(self, trainer: BaseTrainer, state_dict: Mapping[str, Any]) -> None:
        saved = (state_dict.get("hooks") or {}).get(self.name)
        if isinstance(saved, Mapping):
            for key in ("last_step", "epochs_evaluated"):
                check_int(f"checkpoint hooks.{self.name}.{key}", saved.get(key), minimum=0, allow_none=True)
            self.last_step, self.epochs_evaluated = saved.get("last_step"), saved.get("epochs_evaluated")


def _completed_epochs(trainer: BaseTrainer) -> int:
    """Epochs whose last batch was drawn (a loader's length tells at once; without one, the
    epoch counts when the next one started)."""
    per_epoch = trainer.data_cursor.batches_per_epoch()
    return trainer.epoch + (1 if per_epoch and trainer.batch_in_epoch >= per_epoch else 0)


class MetricMonitor:
    """The best value of one evaluation result so far: `mode` "min" or "max", and an
    improvement must beat the best by more than `min_delta`. `owner` names the hook in errors."""

    def __init__(self, owner: str, monitor: str, mode: str, min_delta: float = 0.0) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"{owner}: the monitored metric must be a name such as 'val/loss'; got {monitor!r}")
        check_choice(f"{owner} mode", mode, ("min", "max"))
        check_number(f"{owner}.min_delta", min_delta)
        if min_delta < 0:
            raise ValueError(f"{owner}.min_delta must be >= 0; got {min_delta!r}")
        self.owner, self.monitor, self.mode, self.min_delta = owner, monitor, mode, float(min_delta)
        self.best: float | None = None
        self.best_step: int | None = None
        self._observed: Any = None  # the results last observed, by identity

    def observe(self, trainer: BaseTrainer) -> tuple[float, bool] | None:
        """`(value, is the new best)` for an evaluation at this step that was not observed yet
        (the results dict stays in `step_info` after the step, and an evaluation at the end of
        training brings a new one), else None."""
        results = evaluation_results(trainer)
        if results is None or results is self._observed:
            return None
        self._observed = results
        value = self.value_in(results)
        return value, self.update(value, trainer.step)

    def value_in(self, results: Mapping[str, float]) -> float:
        """The monitored value in `results`, or a ValueError naming the ones there are."""
        if self.monitor not in results:
            raise ValueError(f"{self.owner}: the monitored metric {self.monitor!r} is not among the evaluation "
                             f"results ({', '.join(sorted(results)) or 'none'})")
        return float(results[self.monitor])

    def improves(self, value: float) -> bool:
        """Whether `value` beats the best so far (NaN and inf never do: a diverged evaluation
        is not a best, and the best stays a finite number a checkpoint can hold)."""
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def update(self, value: float, step: int) -> bool:
        """Record `value` at `step`; True when it is the new best."""
        if not self.improves(value):
            return False
        self.best, self.best_step = value, step
        return True

    def state(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "best": self.best, "best_step": self.best_step}

    def restore(self, saved: Any, where: str) -> None:
        """Take the best back from a checkpoint's `saved` state (ignored when it monitored
        another metric or direction: then the best starts over)."""
        if not isinstance(saved, Mapping) or saved.get("monitor") != self.monitor or saved.get("mode") != self.mode:
            return
        best = saved.get("best")
        check_number(f"checkpoint {where}.best", best, allow_none=True)  # finite: improves() takes no other
        check_int(f"checkpoint {where}.best_step", saved.get("best_step"), minimum=0, allow_none=True)
        self.best = None if best is None else float(best)
        self.best_step = saved.get("best_step")


@REGISTRY.register()
class EarlyStoppingHook(BaseHook):
    """Stop training when `monitor` has not improved for `patience` evaluations in a row.

    Args:
        monitor: an evaluation result, e.g. "val/loss" (an `EvalHook` must produce it; a
            name that is not among the results is an error at the first evaluation).
        mode: "min" (lower is better) or "max".
        patience: evaluations without improvement tolerated; the next one stops the run.
        min_delta: an improvement must beat the best by more than this.

    Every rank decides on the same (all-reduced) results, and the trainer agrees on
    `should_stop` across ranks. The best value and the count are saved in checkpoints, so a
    resumed run stops at the same step, and a run that stopped early stays stopped when
    it is started again.
    """

    priority = 6  # after EvalHook (5) evaluated this step

    def __init__(self, monitor: str = "val/loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0) -> None:
        check_int("EarlyStoppingHook.patience", patience, minimum=0)
        self.tracker = MetricMonitor("EarlyStoppingHook", monitor, mode, min_delta)
        self.patience = patience
        self.bad_evaluations = 0  # evaluations in a row without improvement
        self.stopped_step: int | None = None

    @property
    def monitor(self) -> str:
        return self.tracker.monitor

    def on_before_train(self, trainer: BaseTrainer) -> None:
        if not any(isinstance(h, EvalHook) for h in trainer.hooks):
            raise ValueError(f"EarlyStoppingHook(monitor={self.monitor!r}) needs an EvalHook among the trainer's "
                             "hooks: nothing else evaluates during training")
        if self.stopped_step is not None:  # a run that already stopped early, started again
            logger.warning("early stopping: this run stopped at step %d already; not training further",
                           self.stopped_step)
            trainer.should_stop = True

    def on_after_step(self, trainer: BaseTrainer) -> None:
        observed = self.tracker.observe(trainer)
        if observed is None:
            return
        value, improved = observed
        if improved:
            self.bad_evaluations = 0
            return
        self.bad_evaluations += 1
        if self.bad_evaluations > self.patience:
            self.stopped_step = trainer.step
            trainer.should_stop = True
            logger.warning(
                "early stopping at step %d: %s = %.6g has not improved on %.6g (step %s) by more than %g "
                "for %d evaluations (patience %d)", trainer.step, self.monitor, value, self.tracker.best,
                self.tracker.best_step, self.tracker.min_delta, self.bad_evaluations, self.patience)

    def on_state_dict(self, trainer: BaseTrainer, state_dict: dict[str, Any]) -> None:
        state_dict["hooks"]["early_stopping"] = {**self.tracker.state(), "bad_evaluations": self.bad_evaluations,
                                                 "stopped_step": self.stopped_step}

    def on_load_state_dict(self, trainer: BaseTrainer, state_dict: Mapping[str, Any]) -> None:
        saved = (state_dict.get("hooks") or {}).get("early_stopping")
        if not isinstance(saved, Mapping):
            return
        self.tracker.restore(saved, "hooks.early_stopping")
        check_int("checkpoint hooks.early_stopping.bad_evaluations", saved.get("bad_evaluations"), minimum=0)
        check_int("checkpoint hooks.early_stopping.stopped_step", saved.get("stopped_step"), minimum=0,
                  allow_none=True)
        self.bad_evaluations, self.stopped_step = saved["bad_evaluations"], saved.get("stopped_step")
