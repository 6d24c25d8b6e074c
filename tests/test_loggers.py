"""TensorBoardHook and CsvLoggerHook: what they write is what `trainer.log()` received
(compared with LoggingHook's metrics.jsonl), resumed runs keep no duplicate steps, dry_run
writes nothing, bad arguments are refused by name."""

from __future__ import annotations

import csv
import json
import math
import time

import pytest

from helpers import make_trainer, regression_batches
from mini_trainer import BaseHook, CheckpointingHook, CsvLoggerHook, LoggingHook, TensorBoardHook, build_from_cfg

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="needs mini_trainer[tensorboard]"
)


def jsonl(workspace):
    return [json.loads(line) for line in (workspace / "metrics.jsonl").read_text().splitlines()]


def csv_rows(path):
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        return reader.fieldnames, list(reader)


def scalars(log_dir):
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def train(workspace, hooks, max_steps=6, interval=2, **kwargs):
    trainer = make_trainer(regression_batches(8, 4), max_steps=max_steps, workspace=workspace,
                           hooks=[LoggingHook(interval=interval), *hooks], **kwargs)
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    trainer = train(tmp_path, [TensorBoardHook()], max_steps=5)
    trainer.log({"val/loss": 0.25, "m": {"acc": 0.5}})  # after training: a writer of its own
    lines = jsonl(tmp_path)
    got = scalars(tmp_path / "tensorboard")
    assert [step for step, _ in got["loss"]] == [2, 4, 5]
    for name in ("loss", "lr", "grad_norm", "mae"):
        expected = [(line["step"], line[name]) for line in lines if name in line]
        assert [s for s, _ in got[name]] == [s for s, _ in expected]
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert got["val/loss"] == [(5, 0.25)] and got["m.acc"] == [(5, 0.5)]


def test_tensorboard_writes_non_finite_values_and_skips_text(tmp_path):
    trainer = make_trainer(regression_batches(1, 4), max_steps=1, workspace=tmp_path, hooks=[TensorBoardHook("tb")])
    trainer.log({"nan": float("nan"), "inf": float("inf"), "note": "text"})
    got = scalars(tmp_path / "tb")
    assert math.isnan(got["nan"][0][1]) and got["inf"][0][1] == math.inf
    assert "note" not in got


def test_tensorboard_resume_hides_what_the_killed_run_wrote_after_its_checkpoint(tmp_path):
    hooks = [TensorBoardHook(), CheckpointingHook(interval=4)]
    first = train(tmp_path, hooks, max_steps=4)
    # The killed run went on past its checkpoint (step 4): these steps are redone below.
    first.step = 5
    first.log({"loss": 99.0})
    first.step = 6
    first.log({"loss": 99.0})
    # Event files sort by their name (seconds, host, pid, a counter): the resumed run's file
    # must sort after the killed run's, as it does between two processes.
    time.sleep(1.01 - time.time() % 1)
    train(tmp_path, [TensorBoardHook(), CheckpointingHook(interval=4)], max_steps=8)
    got = scalars(tmp_path / "tensorboard")
    assert [step for step, _ in got["loss"]] == [2, 4, 6, 8]
    assert 99.0 not in [value for _, value in got["loss"]]


def test_tensorboard_dry_run_and_other_ranks_write_nothing(tmp_path, monkeypatch):
    trainer = make_trainer(regression_batches(1, 4), max_steps=1, workspace=tmp_path, hooks=[TensorBoardHook()])
    trainer.log({"x": 1.0}, dry_run=True)
    assert not (tmp_path / "tensorboard").exists()
    monkeypatch.setattr("mini_trainer.hooks.tensorboard.is_main_process", lambda: False)
    train(tmp_path, [TensorBoardHook()], max_steps=2)
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_without_workspace_or_log_dir_fails_at_the_start():
    trainer = make_trainer(regression_batches(2, 4), max_steps=2, hooks=[TensorBoardHook()])
    with pytest.raises(ValueError, match="TensorBoardHook.log_dir"):
        trainer.train()
    assert trainer.step == 0


def test_tensorboard_missing_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    trainer = make_trainer(regression_batches(2, 4), max_steps=2, workspace=tmp_path, hooks=[TensorBoardHook()])
    with pytest.raises(ImportError, match=r"pip install 'mini_trainer\[tensorboard\]'"):
        trainer.train()


# ---------------------------------------------------------------------------- CSV


def test_csv_has_one_row_per_logged_step_matching_metrics_jsonl(tmp_path):
    train(tmp_path, [CsvLoggerHook()], max_steps=5)
    header, rows = csv_rows(tmp_path / "metrics.csv")
    lines = jsonl(tmp_path)
    assert header[:2] == ["step", "epoch"]
    assert [int(row["step"]) for row in rows] == [line["step"] for line in lines] == [2, 4, 5]
    for row, line in zip(rows, lines, strict=True):
        assert int(row["epoch"]) == line["epoch"]
        for name in ("loss", "lr", "grad_norm", "mae"):
            assert float(row[name]) == pytest.approx(line[name], rel=1e-12)


def test_csv_header_grows_and_logs_at_one_step_merge(tmp_path):
    seen = []

    class Evaluate(BaseHook):  # logs an evaluation at some steps, in on_after_step as a user's hook would
        def on_after_step(self, trainer):
            if trainer.step in (2, 5):
                trainer.log({"val/loss": trainer.step / 10, "val": {"acc": 0.5}})
                seen.append(trainer.step)

    train(tmp_path, [CsvLoggerHook(), Evaluate()], max_steps=6, interval=2)
    header, rows = csv_rows(tmp_path / "metrics.csv")
    assert seen == [2, 5]
    assert [int(row["step"]) for row in rows] == [2, 4, 5, 6]  # step 2's two logs in one row
    assert header[-2:] == ["val/loss", "val.acc"] and "loss" in header
    by_step = {int(row["step"]): row for row in rows}
    assert float(by_step[2]["val/loss"]) == 0.2 and by_step[2]["loss"] != ""
    assert by_step[4]["val/loss"] == "" and by_step[5]["loss"] == ""
    assert float(by_step[5]["val.acc"]) == 0.5


def test_csv_log_after_training_merges_into_the_last_row_and_grows_the_header(tmp_path):
    trainer = train(tmp_path, [CsvLoggerHook()], max_steps=4)
    trainer.log({"test/accuracy": 0.75})  # what the CLI does after train()
    trainer.log({"test/loss": float("nan"), "big": float("-inf")})
    header, rows = csv_rows(tmp_path / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [2, 4]
    assert header[-3:] == ["test/accuracy", "test/loss", "big"]
    assert rows[0]["test/accuracy"] == "" and rows[0]["loss"] != ""
    assert (rows[1]["test/accuracy"], rows[1]["test/loss"], rows[1]["big"]) == ("0.75", "nan", "-inf")
    assert rows[1]["loss"] != ""  # the merge kept the training metrics
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".metrics.csv")]  # no temporary left


def test_csv_resume_keeps_no_duplicate_steps(tmp_path):
    first = train(tmp_path, [CsvLoggerHook(), CheckpointingHook(interval=4)], max_steps=4)
    # The killed run logged past its checkpoint (step 4), with a metric the resume never logs.
    for step in (5, 6):
        first.step = step
        first.log({"loss": 99.0, "extra": 1.0})
    assert [int(r["step"]) for r in csv_rows(tmp_path / "metrics.csv")[1]] == [2, 4, 5, 6]
    resumed = train(tmp_path, [CsvLoggerHook(), CheckpointingHook(interval=4)], max_steps=8)
    assert resumed.step == 8
    header, rows = csv_rows(tmp_path / "metrics.csv")
    assert [int(row["step"]) for row in rows] == [2, 4, 6, 8]
    assert "99.0" not in [row["loss"] for row in rows]
    assert "extra" in header and all(row["extra"] == "" for row in rows)  # the header is kept
    lines = {line["step"]: line for line in jsonl(tmp_path)}
    assert float(rows[-1]["loss"]) == pytest.approx(lines[8]["loss"], rel=1e-12)


def test_csv_drops_a_torn_last_line_before_appending(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,epoch,loss\n1,0,0.5\n2,0,0.")  # killed in the middle of an append
    trainer = make_trainer(regression_batches(1, 4), max_steps=1, workspace=tmp_path, hooks=[CsvLoggerHook()])
    trainer.step = 3
    trainer.log({"loss": 0.25})
    assert path.read_text() == "step,epoch,loss\n1,0,0.5\n3,0,0.25\n"


def test_csv_row_of_a_failed_step_is_written_when_training_fails(tmp_path):
    def forward(model, batch):
        if trainer.step == 3:
            raise RuntimeError("boom")
        x, y = batch
        return ((model(x) - y) ** 2).mean(), {}

    trainer = make_trainer(regression_batches(8, 4), max_steps=8, workspace=tmp_path, forward_fn=forward,
                           hooks=[LoggingHook(interval=2), CsvLoggerHook()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    # LoggingHook flushes step 3's average when the run fails; the CSV hook writes it after.
    assert [int(row["step"]) for row in csv_rows(tmp_path / "metrics.csv")[1]] == [2, 3]


def test_csv_dry_run_and_other_ranks_write_nothing(tmp_path, monkeypatch):
    trainer = train(tmp_path, [CsvLoggerHook("dry.csv")], max_steps=2, interval=1)
    before = (tmp_path / "dry.csv").read_text()
    trainer.log({"new": 1.0}, dry_run=True)
    assert (tmp_path / "dry.csv").read_text() == before
    fresh = make_trainer(regression_batches(1, 4), max_steps=1, workspace=tmp_path, hooks=[CsvLoggerHook("x.csv")])
    fresh.log({"new": 1.0}, dry_run=True)
    assert not (tmp_path / "x.csv").exists()
    monkeypatch.setattr("mini_trainer.hooks.csv_logger.is_main_process", lambda: False)
    train(tmp_path, [CsvLoggerHook("x.csv")], max_steps=2, interval=1)
    assert not (tmp_path / "x.csv").exists()


def test_csv_refuses_a_file_that_is_not_its_own(tmp_path):
    (tmp_path / "metrics.csv").write_text("name,value\na,1\n")
    trainer = make_trainer(regression_batches(2, 4), max_steps=2, workspace=tmp_path, hooks=[CsvLoggerHook()])
    with pytest.raises(ValueError, match="not a metrics file"):
        trainer.train()
    assert (tmp_path / "metrics.csv").read_text() == "name,value\na,1\n"


def test_csv_without_workspace_or_path_fails_at_the_start():
    trainer = make_trainer(regression_batches(2, 4), max_steps=2, hooks=[CsvLoggerHook()])
    with pytest.raises(ValueError, match="CsvLoggerHook.path"):
        trainer.train()
    assert trainer.step == 0


# ---------------------------------------------------------------------------- both


@pytest.mark.parametrize(
    ("factory", "bad", "error", "match"),
    [
        (TensorBoardHook, 3, TypeError, r"TensorBoardHook\.log_dir .*int 3"),
        (TensorBoardHook, "", ValueError, r"TensorBoardHook\.log_dir"),
        (CsvLoggerHook, ["a.csv"], TypeError, r"CsvLoggerHook\.path .*list \['a.csv'\]"),
        (CsvLoggerHook, "", ValueError, r"CsvLoggerHook\.path"),
    ],
)
def test_bad_arguments_name_the_argument(factory, bad, error, match):
    with pytest.raises(error, match=match):
        factory(bad)


def test_both_are_built_by_name_from_a_config(tmp_path):
    assert isinstance(build_from_cfg({"type": "TensorBoardHook", "log_dir": "tb"}), TensorBoardHook)
    assert isinstance(build_from_cfg({"type": "CsvLoggerHook", "path": str(tmp_path / "m.csv")}), CsvLoggerHook)
