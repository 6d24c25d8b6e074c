"""`mini-trainer plot`: reading metrics.jsonl (merging rule), the panel layout, the PNG, errors."""

from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
from pathlib import Path

import pytest

from mini_trainer.plot import add_plot_command, panel_layout, plot_metrics, read_metrics, run_plot

# A run: interval averages, an evaluation at the same step as a training line, a resume that
# logs steps 20 and 30 again (the later lines win), a non-finite loss (null) and final results.
LINES = [
    {"step": 10, "epoch": 0, "loss": 1.0, "lr": 0.1, "wall_time": 0.02, "data_time": 0.01, "m": {"acc": 0.5}},
    {"step": 20, "epoch": 0, "loss": 0.9, "lr": 0.1, "wall_time": 0.02},
    {"step": 20, "epoch": 0, "val/loss": 0.95, "val/accuracy": 0.6},
    {"step": 30, "epoch": 1, "loss": None, "lr": 0.05, "wall_time": 0.02},
    # killed after step 30, resumed from the checkpoint at step 10:
    {"step": 20, "epoch": 0, "loss": 0.8, "lr": 0.1, "wall_time": 0.03},
    {"step": 20, "epoch": 0, "val/loss": 0.85, "val/accuracy": 0.65},
    {"step": 30, "epoch": 1, "loss": 0.7, "lr": 0.05, "wall_time": 0.03, "m": {"acc": 0.7}},
    {"step": 30, "epoch": 1, "val/loss": 0.75, "ema_val/loss": 0.72, "test/accuracy": 0.8, "note": "text"},
]


def write_run(directory: Path, lines=LINES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path / "run")


@pytest.fixture
def matplotlib():
    return pytest.importorskip("matplotlib")


# ------------------------------------------------------------------ read_metrics


def test_read_metrics_last_value_wins_and_sorted(run):
    series = read_metrics(run / "metrics.jsonl")
    assert series["loss"] == [(10, 1.0), (20, 0.8), (30, 0.7)]  # resumed lines replace the killed run's
    assert series["val/loss"] == [(20, 0.85), (30, 0.75)]
    assert series["m.acc"] == [(10, 0.5), (30, 0.7)]  # nested records are flattened
    assert series["ema_val/loss"] == [(30, 0.72)]
    assert "step" not in series and "epoch" not in series
    assert "note" not in series  # text is not a curve
    assert list(series)[:3] == ["loss", "lr", "wall_time"]  # order of first appearance


def test_read_metrics_null_is_no_point_and_overrides(tmp_path):
    path = write_run(tmp_path, [
        {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": None}, {"step": 3, "loss": None},
        {"step": 4, "only_null": None},
    ]) / "metrics.jsonl"
    series = read_metrics(path)
    assert series == {"loss": [(1, 1.0)]}  # a later null removes step 2's point; all-null metrics vanish


def test_read_metrics_unsorted_steps_and_blank_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "a": 5}\n\n{"step": 1, "a": 1}\n{"step": 3, "a": 3.5}\n')
    assert read_metrics(path) == {"a": [(1, 1.0), (3, 3.5), (5, 5.0)]}


@pytest.mark.parametrize(
    "line, fragment",
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"), ('{"loss": 1}', "integer 'step'"),
     ('{"step": "3", "loss": 1}', "integer 'step'"), ('{"step": true, "loss": 1}', "integer 'step'")],
)
def test_read_metrics_malformed_line_names_file_and_line(tmp_path, line, fragment):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n' + line + "\n")
    with pytest.raises(ValueError, match=fragment) as info:
        read_metrics(path)
    assert f"{path}, line 2" in str(info.value)


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "metrics.jsonl")


# ------------------------------------------------------------------ panel_layout

NAMES = ["loss", "lr", "wall_time", "data_time", "retries", "m.acc", "val/loss", "val/accuracy", "ema_val/loss",
         "test/accuracy", "test/loss"]


def test_panel_layout_default_groups_by_name_after_last_slash():
    assert panel_layout(NAMES) == {
        "loss": ["loss", "val/loss", "ema_val/loss", "test/loss"],
        "lr": ["lr"],
        "m.acc": ["m.acc"],
        "accuracy": ["val/accuracy", "test/accuracy"],  # no training series: evaluations only
    }


def test_panel_layout_training_series_first():
    assert panel_layout(["val/loss", "loss"]) == {"loss": ["loss", "val/loss"]}


def test_panel_layout_selection():
    assert panel_layout(NAMES, "accuracy,loss") == {
        "accuracy": ["val/accuracy", "test/accuracy"], "loss": ["loss", "val/loss", "ema_val/loss", "test/loss"],
    }
    assert panel_layout(NAMES, ["val/loss"]) == {"loss": ["val/loss"]}  # one series only
    assert panel_layout(NAMES, "val/loss, test/loss") == {"loss": ["val/loss", "test/loss"]}  # one shared panel
    assert panel_layout(NAMES, "loss,val/loss,loss") == {"loss": ["loss", "val/loss", "ema_val/loss", "test/loss"]}
    assert panel_layout(NAMES, "wall_time") == {"wall_time": ["wall_time"]}  # left out by default, not when named


@pytest.mark.parametrize("metrics", ["nope", "train/loss", "val/lr", ""])
def test_panel_layout_unknown_metric_lists_the_file(metrics):
    with pytest.raises(ValueError, match=r"metrics \(--metrics\)") as info:
        panel_layout(NAMES, metrics)
    if metrics:
        assert repr(metrics) in str(info.value)
        assert "val/accuracy" in str(info.value) and "panels: loss" in str(info.value)


# ------------------------------------------------------------------ plot_metrics


def test_plot_writes_png_of_the_stated_size(run, matplotlib):
    path = plot_metrics(run)
    assert path == run / "curves.png"
    assert png_size(path) == (1000, 700)  # 4 panels: 2x2 of 5x3.5 inches at 100 dpi
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left
    one = plot_metrics(run, metrics="loss", output=run / "one.png", dpi=50)
    assert png_size(one) == (250, 175)
    five = plot_metrics(run, metrics="loss,lr,m.acc,accuracy,wall_time", output=run / "five.png", dpi=20)
    assert png_size(five) == (300, 140)  # 3 columns x 2 rows


def test_plot_differs_for_different_data(tmp_path, matplotlib):
    first = plot_metrics(write_run(tmp_path / "run"), output=tmp_path / "a.png", dpi=30)
    changed = [dict(line) for line in LINES]
    changed[0]["loss"] = 3.0
    second = plot_metrics(write_run(tmp_path / "run", changed), output=tmp_path / "b.png", dpi=30)
    assert png_size(first) == png_size(second)
    assert second.read_bytes() != first.read_bytes()
    again = plot_metrics(write_run(tmp_path / "run"), output=tmp_path / "c.png", dpi=30)
    assert again.read_bytes() == first.read_bytes()  # drawing is deterministic: the difference is the data


def test_plot_log_y(run, matplotlib, caplog):
    linear = plot_metrics(run, metrics="loss,accuracy", output=run / "linear.png", dpi=30)
    with caplog.at_level(logging.WARNING, logger="mini_trainer.plot"):
        log = plot_metrics(run, metrics="loss,accuracy", output=run / "log.png", log_y=True, dpi=30)
    assert not caplog.records  # every value positive: no panel kept linear
    assert png_size(log) == png_size(linear) and log.read_bytes() != linear.read_bytes()

    negative = write_run(run.parent / "negative", [{"step": 1, "loss": 1.0, "score": -1.0}, {"step": 2, "score": 2.0}])
    with caplog.at_level(logging.WARNING, logger="mini_trainer.plot"):
        plot_metrics(negative, log_y=True, dpi=30)
    assert "score" in caplog.text and "loss" not in caplog.text.split("for ")[-1]


def test_plot_does_not_touch_the_global_backend(run, matplotlib):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # the raw setting: reading it resolves nothing
    plot_metrics(run, dpi=30)
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot  # no pyplot: no figure registry, no backend switch


def test_plot_errors(tmp_path, run, matplotlib):
    with pytest.raises(FileNotFoundError, match="run_dir .* does not exist"):
        plot_metrics(tmp_path / "missing")
    with pytest.raises(ValueError, match="run_dir .* is not a directory"):
        plot_metrics(run / "metrics.jsonl")
    (tmp_path / "bare").mkdir()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in run_dir .*looked for.*LoggingHook.*workspace"):
        plot_metrics(tmp_path / "bare")
    (tmp_path / "bare" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        plot_metrics(tmp_path / "bare")
    (tmp_path / "bare" / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "loss": null}\n')
    with pytest.raises(ValueError, match="no metric values"):
        plot_metrics(tmp_path / "bare")
    (tmp_path / "bare" / "metrics.jsonl").write_text('{"step": 1, "epoch": 0, "wall_time": 0.1}\n')
    with pytest.raises(ValueError, match="only timing/bookkeeping"):
        plot_metrics(tmp_path / "bare")
    with pytest.raises(ValueError, match="'val/acc' is not in the file; its series are loss, lr"):
        plot_metrics(run, metrics="loss,val/acc")
    with pytest.raises(ValueError, match=r"output \(-o\) .* must end in .png"):
        plot_metrics(run, output=run / "curves.pdf")
    with pytest.raises(FileNotFoundError, match=r"output \(-o\) .* does not exist"):
        plot_metrics(run, output=tmp_path / "no" / "such" / "c.png")
    with pytest.raises(ValueError, match=r"dpi \(--dpi\)"):
        plot_metrics(run, dpi=0)
    assert not (run / "curves.png").exists()  # nothing written on an error


def test_missing_matplotlib_names_the_extra(run, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` of a None entry raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'mini_trainer\[examples\]'"):
        plot_metrics(run)


# ------------------------------------------------------------------ the command


def parse(argv):
    parser = argparse.ArgumentParser(prog="mini-trainer")
    add_plot_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_command_prints_the_path(run, matplotlib, capsys):
    out = run / "c.png"
    assert run_plot(parse(["plot", str(run), "--metrics", "loss", "--metrics", "val/accuracy,lr", "-o", str(out),
                           "--log-y", "--dpi", "20"])) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert png_size(out) == (200, 140)  # 3 panels: 2x2 grid, one cell empty


def test_command_usage_errors_exit_2(tmp_path, run, capsys):
    assert run_plot(parse(["plot", str(tmp_path / "missing")])) == 2
    assert capsys.readouterr().err.startswith("mini-trainer: error: run_dir ")
    assert run_plot(parse(["plot", str(run), "--metrics", "bogus"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("mini-trainer: error: metrics (--metrics): 'bogus' is not in the file") and "val/loss" in err


def test_command_help(capsys):
    with pytest.raises(SystemExit):
        parse(["plot", "--help"])
    text = capsys.readouterr().out
    assert "metrics.jsonl" in text and "--log-y" in text and "val/loss" in text and "LoggingHook" in text
