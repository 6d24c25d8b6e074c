"""Hooks: dispatch, ordering by priority (never by list position), logging and progress."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

from helpers import make_trainer, regression_batches
from mini_trainer import BaseHook, LoggingHook, ProgressHook
from mini_trainer.hooks.base import overridden_events


class Recorder(BaseHook):
    def __init__(self, name, log, priority=0):
        self.name, self.log = name, log
        self.priority = priority

    def on_before_train(self, trainer):
        self.log.append((self.name, "before_train", trainer.step))

    def on_after_step(self, trainer):
        self.log.append((self.name, "after_step", trainer.step))

    def on_after_train(self, trainer):
        self.log.append((self.name, "after_train", trainer.step))


def test_hooks_run_in_priority_order_whatever_the_list_order():
    for order in ([0, 1], [1, 0]):
        log = []
        hooks = [Recorder("late", log, priority=5), Recorder("early", log, priority=-5)]
        trainer = make_trainer(regression_batches(2, 4), max_steps=2, hooks=[hooks[i] for i in order])
        trainer.train()
        assert [name for name, event, _ in log if event == "after_step"] == ["early", "late"] * 2
        assert log[0] == ("early", "before_train", 0) and log[-1] == ("late", "after_train", 2)


def test_only_overridden_events_are_dispatched():
    assert overridden_events(BaseHook()) == []
    assert set(overridden_events(Recorder("r", []))) == {"on_before_train", "on_after_step", "on_after_train"}


def test_log_fans_out_to_every_on_log_hook():
    received = []

    class Sink(BaseHook):
        def on_log(self, trainer, records, dry_run=False):
            received.append((dict(records), dry_run))

    trainer = make_trainer(regression_batches(1, 4), max_steps=1, hooks=[Sink(), Sink()])
    trainer.log({"x": 1.0})
    assert received == [({"x": 1.0}, False)] * 2


def _constant_loss_forward(values):
    it = iter(values)

    def forward(model, batch):
        x, _ = batch
        value = next(it)
        # a differentiable loss whose value is exactly `value`
        loss = (model(x) * 0).sum() + value
        return loss, {"acc": torch.tensor(value / 10), "nested": {"count": 1}}

    return forward


def test_logging_hook_averages_each_interval_and_writes_metrics_jsonl(tmp_path):
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    trainer = make_trainer(regression_batches(5, 4), max_steps=5, workspace=tmp_path,
                           forward_fn=_constant_loss_forward(values), hooks=[LoggingHook(interval=2)])
    logged = []
    trainer._given["hooks"].append(
        type("Tap", (BaseHook,), {"on_log": lambda self, t, r, dry_run=False: logged.append(r)})()
    )
    trainer.train()
    assert [r["loss"] for r in logged] == pytest.approx([1.5, 3.5, 5.0])  # intervals 2, 2, then the rest
    assert logged[0]["acc"] == pytest.approx(0.15)
    assert logged[0]["nested"] == {"count": 1.0}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 5]
    assert lines[1]["loss"] == pytest.approx(3.5)
    assert {"grad_norm", "lr", "data_time", "step_time"} <= set(lines[0])


def test_logging_hook_without_workspace_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer(regression_batches(2, 4), max_steps=2, hooks=[LoggingHook(interval=1)])
    trainer.train()
    assert list(tmp_path.iterdir()) == []


LINE = re.compile(
    r"^Step (\d+)/(\d+): step \d+\.\d{4}s data \d+\.\d{4}s (eta \d+:\d\d:\d\d )?"
    r"loss \S+ grad_norm \S+ lr \d\.\d\de[-+]\d\d samples/s \S+ \| mae \S+$"
)


def test_progress_prints_one_line_per_interval_without_a_tty():
    out = io.StringIO()
    trainer = make_trainer(regression_batches(10, 4), max_steps=10,
                           hooks=[ProgressHook(interval=4, eta_warmup=1, file=out)])
    trainer.train()
    lines = out.getvalue().splitlines()
    assert [LINE.match(line).group(1) for line in lines] == ["4", "8", "10"]
    assert all(LINE.match(line).group(2) == "10" for line in lines)
    assert "eta 0:00:00" in lines[1]


def test_progress_without_records_and_with_epochs_only():
    out = io.StringIO()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*regression_batches(1, 16)[0]), batch_size=4)
    trainer = make_trainer(loader, max_epochs=2, hooks=[ProgressHook(interval=8, with_records=False, file=out)])
    trainer.train()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("Step 8/8: ") and "|" not in line


def test_progress_bar_mode_draws_a_tqdm_bar():
    out = io.StringIO()
    trainer = make_trainer(regression_batches(6, 4), max_steps=6, hooks=[ProgressHook(interval=3, file=out, bar=True)])
    trainer.train()
    text = out.getvalue()
    assert "6/6" in text and "loss" in text and "Step " not in text


def test_records_may_mix_numbers_and_tensors_and_skip_nan():
    values = iter([{"a": 1.0, "b": torch.tensor(float("nan"))}, {"a": torch.tensor(3.0), "b": torch.tensor(2.0)}])

    def forward(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean(), next(values)

    logged = []
    tap = type("Tap", (BaseHook,), {"on_log": lambda self, t, r, dry_run=False: logged.append(r)})()
    trainer = make_trainer(regression_batches(2, 4), max_steps=2, forward_fn=forward,
                           hooks=[LoggingHook(interval=2), tap])
    trainer.train()
    assert logged[0]["a"] == pytest.approx(2.0) and logged[0]["b"] == pytest.approx(2.0)


def test_synced_logging_under_a_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        values = [1.0, 2.0, 3.0, 4.0]
        logged = []
        tap = type("Tap", (BaseHook,), {"on_log": lambda self, t, r, dry_run=False: logged.append((r, dry_run))})()
        trainer = make_trainer(regression_batches(4, 4), max_steps=4, forward_fn=_constant_loss_forward(values),
                               hooks=[LoggingHook(interval=4, sync=True),
                                      ProgressHook(interval=2, sync=True, file=io.StringIO()), tap])
        trainer.train()
        (records, dry_run), = logged
        assert records["loss"] == pytest.approx(2.5) and records["nested"] == {"count": 1.0} and dry_run is False
    finally:
        dist.destroy_process_group()


def test_log_before_training_builds_only_the_hooks_and_writes_jsonl(tmp_path):
    from mini_trainer import BaseTrainer

    class NotYet(BaseTrainer):
        def build_model(self):
            raise AssertionError("log() must not build the model")

    trainer = NotYet(workspace=tmp_path, hooks=[LoggingHook()], device="cpu")
    trainer.log({"eval_accuracy": 0.5, "bad": float("nan"), "t": torch.tensor(float("inf"))})
    trainer.log({"eval_accuracy": 0.75})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 0, "epoch": 0, "eval_accuracy": 0.5, "bad": None, "t": None},
        {"step": 0, "epoch": 0, "eval_accuracy": 0.75},
    ]


def test_a_crash_still_logs_the_steps_before_it_and_closes_the_bar(tmp_path):
    from mini_trainer import NonFiniteGradientError

    batches = regression_batches(6, 4)
    batches[3] = (torch.full((4, 4), float("nan")), torch.zeros(4, 1))
    out = io.StringIO()
    progress = ProgressHook(interval=100, file=out, bar=True)
    trainer = make_trainer(batches, max_steps=6, workspace=tmp_path, hooks=[LoggingHook(interval=100), progress])
    with pytest.raises(NonFiniteGradientError, match="step 4"):
        trainer.train()
    (line,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert line["step"] == 3 and line["loss"] > 0
    assert progress._tqdm is None


def test_fp16_overflow_steps_do_not_turn_the_logged_grad_norm_into_inf():
    batches = regression_batches(4, 8)
    batches[1] = (torch.full((8, 4), float("inf")), torch.zeros(8, 1))
    logged = []
    tap = type("Tap", (BaseHook,), {"on_log": lambda self, t, r, dry_run=False: logged.append(r)})()
    trainer = make_trainer(batches, max_steps=4, mixed_precision="fp16", grad_clip=10.0,
                           grad_scaler=torch.amp.GradScaler("cpu", init_scale=16.0),
                           hooks=[LoggingHook(interval=4), tap])
    trainer.train()
    assert 0 < logged[0]["grad_norm"] < float("inf")
