"""`CheckpointingHook(keep_best=...)` and `EarlyStoppingHook`: what is kept, what is
pointed at, what survives a resume, and the errors for names that never appear."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from helpers import flat_params, make_trainer, regression_batches
from mini_trainer import BaseHook, CheckpointingHook, EarlyStoppingHook, EvalHook, checkpoint
from mini_trainer.hooks.evaluation import MetricMonitor


class ScriptedEval(BaseHook):
    """Replaces the evaluation results of each step with scripted values (after EvalHook ran)."""

    priority = 5.5

    def __init__(self, values):
        self.values = values

    def on_after_step(self, trainer):
        self.on_after_train(trainer)

    def on_after_train(self, trainer):
        if "eval" in trainer.step_info and trainer.step_info["eval"].get("scripted") is None:
            value = self.values.get(trainer.step, 9.0)  # an evaluation at a run's end: not a best
            trainer.step_info["eval"] = {"val/loss": value, "val/score": -value, "scripted": 1.0}


VALUES = {2: 5.0, 4: 3.0, 6: 4.0, 8: 2.5, 10: 2.6, 12: 2.7, 14: 2.8, 16: 2.9}


def make(workspace, *, max_steps=16, values=VALUES, checkpointing=None, stopping=None, **kwargs):
    hooks = [EvalHook(interval=2), ScriptedEval(values)]
    hooks.append(checkpointing or CheckpointingHook(interval=3, keep_previous=1, keep_best="val/loss"))
    if stopping is not None:
        hooks.append(stopping)
    return make_trainer(regression_batches(5, 4), max_steps=max_steps, workspace=workspace, seed=0,
                        eval_loaders=regression_batches(2, 3, seed=9), hooks=hooks, **kwargs)


def names(root):
    return sorted(p.name for p in root.glob("step_*"))


def test_best_is_saved_pointed_at_recorded_and_never_pruned(tmp_path):
    trainer = make(tmp_path)
    trainer.train()
    root = tmp_path / "checkpoints"
    assert (root / "best").read_text() == "step_000000008\n"
    assert names(root) == ["step_000000008", "step_000000016"]  # keep_previous=1: the newest, and the best
    manifest = json.loads((root / "step_000000008" / "manifest.json").read_text())
    assert manifest["best"] == {"metric": "val/loss", "mode": "min", "value": 2.5}
    assert manifest["metrics"] == {"val/loss": 2.5, "val/score": -2.5, "scripted": 1.0}
    assert "best" not in json.loads((root / "step_000000016" / "manifest.json").read_text())
    hook = next(h for h in trainer.hooks if isinstance(h, CheckpointingHook))
    assert (hook.best.tracker.best, hook.best.tracker.best_step) == (2.5, 8)


def test_async_saves_record_the_best_and_the_metrics_too(tmp_path):
    # The background writer used to get a copy of the checkpoint without its manifest
    # entries: no metrics, no best entry, no `best` file.
    hook = CheckpointingHook(interval=3, keep_previous=1, keep_best="val/loss", async_save=True)
    make(tmp_path, checkpointing=hook).train()
    root = tmp_path / "checkpoints"
    assert (root / "best").read_text() == "step_000000008\n"
    manifest = json.loads((root / "step_000000008" / "manifest.json").read_text())
    assert manifest["best"] == {"metric": "val/loss", "mode": "min", "value": 2.5}
    assert manifest["metrics"]["val/loss"] == 2.5 and manifest["optimizer_class"] == "torch.optim.sgd.SGD"


def test_best_mode_max(tmp_path):
    trainer = make(tmp_path, checkpointing=CheckpointingHook(interval=None, keep_best="val/score", best_mode="max"))
    trainer.train()
    assert (tmp_path / "checkpoints" / "best").read_text() == "step_000000008\n"


def test_best_value_survives_a_resume_and_load_best_loads_it(tmp_path):
    make(tmp_path, max_steps=9).train()  # best 2.5 at step 8, checkpoint at 9
    resumed = make(tmp_path, values={**VALUES, 10: 2.6})  # 2.6 at step 10 is worse than the saved best
    resumed.train()
    root = tmp_path / "checkpoints"
    assert (root / "best").read_text() == "step_000000008\n"

    reference = make(tmp_path / "ref", max_steps=8)
    reference.train()
    best = make(tmp_path, checkpointing=CheckpointingHook(interval=None, keep_best="val/loss", load="best"))
    best.build()
    hook = next(h for h in best.hooks if isinstance(h, CheckpointingHook))
    hook.on_before_train(best)
    hook.on_exception(best, RuntimeError())  # release the directory lock
    assert best.step == 8 and torch.equal(flat_params(best.model), flat_params(reference.model))


def test_restore_best_after_training(tmp_path):
    trainer = make(tmp_path)
    trainer.train()
    hook = next(h for h in trainer.hooks if isinstance(h, CheckpointingHook))
    reference = make(tmp_path / "ref", max_steps=8)
    reference.train()
    assert hook.restore_best(trainer) == tmp_path / "checkpoints" / "step_000000008"
    assert trainer.step == 8 and torch.equal(flat_params(trainer.model), flat_params(reference.model))


def test_a_resume_past_a_damaged_best_points_best_back(tmp_path, caplog):
    make(tmp_path, max_steps=9, checkpointing=CheckpointingHook(interval=3, keep_previous=5, keep_best="val/loss")
         ).train()  # checkpoints 3, 4 (best 3.0), 6, 8 (best 2.5), 9
    root = tmp_path / "checkpoints"
    for name in ("step_000000009", "step_000000008"):  # the newest two are damaged
        (root / name / "model.safetensors").write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING, logger="mini_trainer"):
        make(tmp_path, max_steps=6, checkpointing=CheckpointingHook(interval=3, keep_previous=5, keep_best="val/loss")
             ).train()  # resumes from step 6, whose best was step 4
    assert (root / "best").read_text() == "step_000000004\n"


def test_load_best_without_a_best_is_a_clear_error(tmp_path):
    trainer = make(tmp_path, checkpointing=CheckpointingHook(keep_best="val/loss", load="best"))
    with pytest.raises(checkpoint.CheckpointError, match="load='best'.*has no `best` file"):
        trainer.train()


def test_a_monitored_name_that_never_appears_fails_at_the_first_evaluation(tmp_path):
    trainer = make(tmp_path, checkpointing=CheckpointingHook(keep_best="val/accuracy"))
    needle = r"'val/accuracy' is not among the evaluation results \(scripted, val/loss, val/score\)"
    with pytest.raises(ValueError, match=needle):
        trainer.train()
    assert trainer.step == 2
    stopper = make(tmp_path / "b", checkpointing=CheckpointingHook(), stopping=EarlyStoppingHook(monitor="loss"))
    with pytest.raises(ValueError, match=r"EarlyStoppingHook: the monitored metric 'loss' is not among"):
        stopper.train()


@pytest.mark.parametrize(
    "make_hook, error, needle",
    [
        (lambda: CheckpointingHook(keep_best="val/loss", best_mode="lowest"), ValueError,
         "CheckpointingHook.best_mode must be one of 'min', 'max'; got 'lowest'"),
        (lambda: CheckpointingHook(keep_best=3), TypeError, "CheckpointingHook.keep_best must be an evaluation"),
        (lambda: EarlyStoppingHook(patience=-1), ValueError, "EarlyStoppingHook.patience must be an integer >= 0"),
        (lambda: EarlyStoppingHook(mode="up"), ValueError, "EarlyStoppingHook mode must be one of 'min', 'max'"),
        (lambda: EarlyStoppingHook(min_delta=-0.1), ValueError, "EarlyStoppingHook.min_delta must be >= 0"),
        (lambda: EarlyStoppingHook(monitor=""), TypeError, "the monitored metric must be a name"),
    ],
)
def test_bad_arguments(make_hook, error, needle):
    with pytest.raises(error, match=needle):
        make_hook()


def test_keep_best_and_early_stopping_need_an_eval_hook(tmp_path):
    for hook in (CheckpointingHook(keep_best="val/loss"), EarlyStoppingHook()):
        trainer = make_trainer(regression_batches(2, 4), max_steps=2, workspace=tmp_path, hooks=[hook])
        with pytest.raises(ValueError, match="needs an EvalHook"):
            trainer.train()
        assert trainer.step == 0


# =========================================================================== early stopping


def test_early_stopping_counts_evaluations_without_improvement(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mini_trainer"):
        trainer = make(tmp_path, stopping=EarlyStoppingHook(patience=2))
        trainer.train()
    # best 2.5 at step 8; 2.6, 2.7 are within patience, 2.8 (step 14) is the third without improvement
    assert trainer.step == 14
    assert "early stopping at step 14: val/loss = 2.8 has not improved on 2.5 (step 8)" in caplog.text


def test_early_stopping_min_delta_and_max_mode(tmp_path):
    values = {2: 1.0, 4: 1.05, 6: 1.09, 8: 1.2, 10: 1.25, 12: 1.3, 14: 2.0, 16: 2.1}
    trainer = make(tmp_path, values={k: -v for k, v in values.items()},
                   stopping=EarlyStoppingHook(monitor="val/score", mode="max", patience=1, min_delta=0.1))
    trainer.train()
    assert trainer.step == 6  # 1.05 and 1.09 do not beat 1.0 by more than 0.1


def test_early_stopping_state_survives_a_resume_and_a_stopped_run_stays_stopped(tmp_path, caplog):
    reference = make(tmp_path / "ref", stopping=EarlyStoppingHook(patience=2))
    reference.train()
    make(tmp_path, max_steps=11, stopping=EarlyStoppingHook(patience=2)).train()  # saved at 9 and at 11
    resumed = make(tmp_path, stopping=EarlyStoppingHook(patience=2))
    resumed.train()
    assert resumed.step == reference.step == 14
    assert torch.equal(flat_params(resumed.model), flat_params(reference.model))
    with caplog.at_level(logging.WARNING, logger="mini_trainer"):
        again = make(tmp_path, max_steps=30, stopping=EarlyStoppingHook(patience=2))
        again.train()
    assert again.step == 14 and "stopped at step 14 already" in caplog.text


def test_metric_monitor_ignores_nan_and_inf():
    tracker = MetricMonitor("test", "val/loss", "min")
    assert tracker.update(float("nan"), 1) is False and tracker.best is None
    assert tracker.update(-float("inf"), 1) is False and tracker.best is None  # a best must be a number to resume
    assert tracker.update(2.0, 2) and not tracker.update(float("nan"), 3) and tracker.best_step == 2


def test_a_best_checkpoint_that_is_gone_is_forgotten_on_resume(tmp_path, caplog):
    values = {2: 1.0, 4: 2.0, 6: 0.4, 8: 3.0}
    hook = CheckpointingHook(interval=3, keep_previous=2, keep_best="val/loss")
    make(tmp_path, max_steps=6, values=values, checkpointing=hook).train()  # best 1.0 at 2 (pruned later), 0.4 at 6
    root = tmp_path / "checkpoints"
    assert names(root) == ["step_000000003", "step_000000006"]
    (root / "step_000000006" / "model.safetensors").write_bytes(b"damaged")  # resume falls back to step 3
    resumed_hook = CheckpointingHook(interval=3, keep_previous=2, keep_best="val/loss")
    with caplog.at_level(logging.WARNING, logger="mini_trainer"):
        make(tmp_path, max_steps=8, values=values, checkpointing=resumed_hook).train()
    assert "the best checkpoint" in caplog.text and "is gone" in caplog.text
    # forgotten, so the next evaluation (step 4: 2.0) became the best, then step 6 (0.4) again
    assert (root / "best").read_text() == "step_000000006\n"
    assert resumed_hook.best.tracker.best == 0.4
