"""mini_trainer.stream: every stage, laziness, fitstream compatibility (the real package,
side by side, when installed: `make test` installs fitstream 0.4.1), and
`BaseTrainer.events()` on full-featured runs."""

from __future__ import annotations

import doctest
import inspect
import io
import json
import math
import sys

import pytest
import torch
from torch import nn

import mini_trainer.stream as stream
from helpers import flat_params, make_trainer, regression_batches
from mini_trainer import BaseHook, CheckpointingHook, LoggingHook
from mini_trainer.stream import (
    BestModel,
    augment,
    best_model,
    collect,
    collect_jsonl,
    collect_pd,
    early_stop,
    ema,
    epoch_stream,
    evaluate,
    iter_batches,
    live_plot,
    pipe,
    print_keys,
    take,
    tap,
    tick,
    validation_loss,
)

STREAM_MODULES = [stream.events, stream.sources, stream.stages, stream.sinks, stream.augmenters, stream.plotting]
FITSTREAM_NAMES = [
    "Event", "epoch_stream", "iter_batches", "pipe", "augment", "take", "tap", "tick", "print_keys", "ema",
    "early_stop", "collect", "collect_jsonl", "collect_pd", "evaluate", "validation_loss", "BestModel",
    "best_model", "LivePlot", "live_plot",
]


def test_doc_examples_run_as_doctests():
    # The examples live in the package's modules (stream.sources, stream.stages...).
    results = [doctest.testmod(module, optionflags=doctest.ELLIPSIS) for module in STREAM_MODULES]
    assert sum(result.failed for result in results) == 0
    assert sum(result.attempted for result in results) >= 35


# --------------------------------------------------------------------------- data


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g))
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def _counting_source(n, pulled):
    for i in range(1, n + 1):
        pulled.append(i)
        yield {"step": i, "loss": float(10 - i)}


# --------------------------------------------------------------------------- sources


def test_iter_batches_aligned_last_batch_smaller_and_shuffle_is_a_permutation():
    x = torch.arange(10)
    y = torch.arange(10) * 10
    batches = list(iter_batches(x, y, batch_size=4, shuffle=False))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    shuffled = list(iter_batches(x, y, batch_size=3, generator=torch.Generator().manual_seed(1)))
    xs = torch.cat([b[0] for b in shuffled])
    assert sorted(xs.tolist()) == list(range(10)) and xs.tolist() != list(range(10))
    assert all(torch.equal(b[1], b[0] * 10) for b in shuffled)  # rows stay aligned
    again = list(iter_batches(x, y, batch_size=3, generator=torch.Generator().manual_seed(1)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(shuffled, again, strict=True))
    assert list(iter_batches(batch_size=2)) == []


def test_iter_batches_rejects_bad_input_on_the_first_next_like_fitstream():
    batches = iter_batches(torch.arange(3), batch_size=0)  # a generator: nothing raised at the call
    with pytest.raises(RuntimeError, match="split_size"):
        next(batches)
    batches = iter_batches(torch.arange(3), torch.arange(4))
    with pytest.raises(ValueError, match=r"first \(sample\) dimension.*\(3,\), \(4,\)"):
        next(batches)


def test_epoch_stream_trains_and_emits_fitstream_keys():
    x, y = _data()
    model = _model()
    events = epoch_stream((x, y), model, torch.optim.Adam(model.parameters(), lr=0.05), nn.MSELoss(),
                          batch_size=16, generator=torch.Generator().manual_seed(0), extra={"run": "a"}, step_offset=10)
    first, *_, last = list(take(30)(events))
    assert set(first) == {"model", "step", "train_loss", "train_time_sec", "run"}
    assert (first["step"], last["step"]) == (11, 40)
    assert first["model"] is model and isinstance(first["train_loss"], float) and first["train_time_sec"] > 0
    assert last["train_loss"] < 0.2 * first["train_loss"]


def test_epoch_stream_loss_is_the_sample_weighted_epoch_mean_and_label_free_losses_work():
    x = torch.tensor([[1.0], [2.0], [3.0]])
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    event = next(epoch_stream((x,), model, sgd, lambda p: (p - 1.0).pow(2).mean(), batch_size=2, shuffle=False,
                              last_label=False))
    assert event["train_loss"] == pytest.approx(1.0)  # batches of 2 and 1, weighted by size
    y = x * 2
    event = next(epoch_stream((x, y), model, sgd, nn.MSELoss(), batch_size=2, shuffle=False))
    assert event["train_loss"] == pytest.approx((4 + 16 + 36) / 3)


def test_epoch_stream_rejects_bad_arguments_on_the_first_next_like_fitstream():
    x, y = _data(8)
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for error, message, data, kwargs in [
        (ValueError, "batch_size must be a positive integer. Got batch_size=0", (x, y), {"batch_size": 0}),
        (ValueError, "last_label=True requires at least two tensors", (x,), {}),
        (ValueError, "train_data must contain at least one tensor", (), {}),
        (TypeError, "step_offset must be an integer. Got step_offset=1.5", (x, y), {"step_offset": 1.5}),
    ]:
        events = epoch_stream(data, model, sgd, nn.MSELoss(), **kwargs)  # a generator: nothing raised yet
        with pytest.raises(error, match=message):
            next(events)


# --------------------------------------------------------------------------- stages


def test_take_never_pulls_past_its_limit():
    pulled = []
    assert [e["step"] for e in take(3)(_counting_source(100, pulled))] == [1, 2, 3]
    assert pulled == [1, 2, 3]
    pulled.clear()
    assert list(take(0)(_counting_source(100, pulled))) == [] and pulled == []
    pulled.clear()
    # Inside a pipe, behind other stages, too.
    out = list(pipe(_counting_source(100, pulled), augment(lambda e: {"x": 1}), ema("loss", decay=0.5), take(2)))
    assert len(out) == 2 and pulled == [1, 2]
    with pytest.raises(ValueError, match="n must be >= 0. Got n=-1"):
        take(-1)
    with pytest.raises(TypeError, match="not supported.*Got n='2'"):
        take("2")
    stage = take(2.5)(iter([{}]))  # as in fitstream: islice rejects it on the first next()
    with pytest.raises(ValueError, match="islice"):
        next(stage)


def test_pipe_applies_stages_left_to_right_and_checks_them():
    add = augment(lambda e: {"x": e["x"] + 1})
    double = augment(lambda e: {"x": e["x"] * 2})
    assert list(pipe([{"x": 1}], add, double)) == [{"x": 4}]
    assert list(pipe([{"x": 1}], double, add)) == [{"x": 3}]
    assert pipe([{"x": 1}]) == [{"x": 1}]
    with pytest.raises(TypeError, match="pipe stages must be callable. Got stage 1: int"):
        pipe([], add, 3)


def test_augment_merges_without_mutating_and_checks_the_return():
    events = [{"a": 1}]
    out = list(augment(lambda e: {"b": 2})(events))
    assert out == [{"a": 1, "b": 2}] and events == [{"a": 1}]
    assert list(augment(lambda e: None)(events)) == [{"a": 1}]
    with pytest.raises(TypeError, match="augment function must return a dict or None. It returned list"):
        list(augment(lambda e: [1])(events))
    stage = augment(3)(iter(events))  # as in fitstream: found when it is called, on the first event
    with pytest.raises(TypeError, match="'int' object is not callable"):
        next(stage)


def test_tap_calls_on_schedule_and_tick_once_per_event():
    seen, ticks = [], []
    out = list(pipe(({"step": i} for i in range(1, 11)), tap(lambda e: seen.append(e["step"]), every=3, start=2),
                    tick(lambda: ticks.append(1))))
    assert seen == [2, 5, 8] and len(ticks) == 10 and len(out) == 10
    for bad in ({"every": 0}, {"start": 0}):
        with pytest.raises(ValueError):
            tap(print, **bad)
    with pytest.raises(TypeError):
        tap(3)
    with pytest.raises(TypeError):
        tick(None)


def test_print_keys_formats_like_fitstream(capsys):
    show = print_keys("loss", "flag", "name", "missing", precision=3)
    show({"step": 7, "loss": torch.tensor([0.5]), "flag": False, "name": "run", "missing_not": 1})
    show({"step": "last", "loss": 2})
    print_keys("loss", include_step=False)({"step": 1, "loss": 1.0})
    assert capsys.readouterr().out.splitlines() == [
        "step=0007 loss=0.500 flag=False name=run missing=NA",
        "step=last loss=2.000 flag=NA name=NA missing=NA",
        "loss=1.0000",
    ]
    with pytest.raises(ValueError, match="precision"):
        print_keys("a", precision=-1)
    with pytest.raises(ValueError, match="at least one key"):
        print_keys(include_step=False)


def test_ema_matches_the_formula_with_and_without_bias_correction():
    values = [3.0, 1.0, 4.0, 1.0, 5.0]
    decay = 2 ** (-1 / 2.0)
    out = list(ema("v", half_life=2.0, out_key="smooth")({"v": v} for v in values))
    m = 0.0
    for t, (v, event) in enumerate(zip(values, out, strict=True), start=1):
        m = decay * m + (1 - decay) * v
        assert event["smooth"] == pytest.approx(m / (1 - decay**t))
    raw = list(ema("v", decay=0.9, bias_correction=False)([{"v": torch.tensor(2.0)}]))
    assert raw[0]["v_ema"] == pytest.approx(0.2)
    for bad in ({}, {"decay": 0.5, "half_life": 1.0}, {"decay": 1.0}, {"half_life": 0.0}):
        with pytest.raises(ValueError):
            ema("v", **bad)
    with pytest.raises(KeyError):
        list(ema("v", decay=0.5)([{"w": 1}]))


@pytest.mark.parametrize(
    "values, kwargs, kept",
    [
        ([5, 4, 4.5, 4.2, 3], {"patience": 2}, 4),  # two non-improving in a row: stop after the 2nd
        ([5, 4, 4.5, 3, 3.5, 3.2], {"patience": 2}, 6),  # the streak restarts at an improvement
        ([1, 2, 3, 2, 2], {"patience": 2, "mode": "max"}, 5),
        ([5, 4.95, 4.9, 4.0], {"patience": 2, "min_delta": 0.2}, 3),  # tiny gains don't count
    ],
)
def test_early_stop(values, kwargs, kept):
    pulled = []

    def source():
        for v in values:
            pulled.append(v)
            yield {"val": v}

    out = list(early_stop("val", **kwargs)(source()))
    assert [e["val"] for e in out] == values[:kept]
    assert len(pulled) == kept  # nothing pulled after the stop


def test_early_stop_rejects_bad_arguments():
    with pytest.raises(TypeError, match="'<' not supported.*Got patience='2'; allowed: an int >= 1"):
        early_stop("val", "2")
    with pytest.raises(ValueError, match="patience must be >= 1. Got patience=0"):
        early_stop("val", 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        early_stop("val", 2, mode="up")
    with pytest.raises(ValueError, match="min_delta"):
        early_stop("val", 2, min_delta=-1)


def test_collect_filters_and_turns_scalar_tensors_into_numbers():
    events = [{"step": 1, "loss": torch.tensor(0.5), "records": {"acc": torch.tensor(1.0)}, "model": nn.Linear(1, 1),
               "trainer": object(), "vec": torch.ones(2)}]
    row = collect(events)[0]
    assert row["loss"] == 0.5 and row["records"] == {"acc": 1.0} and "model" not in row and "trainer" not in row
    assert torch.equal(row["vec"], torch.ones(2))  # not a scalar: left as it is
    assert collect(events, include=["step", "model"]) == [{"step": 1}]
    assert collect(events, exclude=["vec", "records"]) == [{"step": 1, "loss": 0.5}]
    with pytest.raises(ValueError, match="Provide only one of include or exclude"):
        collect(events, include=["a"], exclude=["b"])
    with pytest.raises(TypeError, match="single string"):
        collect(events, include="step")


def test_collect_jsonl_to_a_path_and_to_an_open_file(tmp_path):
    events = [{"step": i, "loss": torch.tensor(float(i)), "model": None} for i in (1, 2)]
    path = tmp_path / "run.jsonl"
    path.write_text("old\n")
    collect_jsonl(iter(events), path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    buffer = io.StringIO()
    collect_jsonl(events, buffer, include=["loss"])
    assert buffer.getvalue() == '{"loss": 1.0}\n{"loss": 2.0}\n'


def test_collect_jsonl_keeps_the_lines_of_events_before_a_crash(tmp_path):
    def crashing():
        yield {"step": 1}
        raise RuntimeError("boom")

    path = tmp_path / "run.jsonl"
    with pytest.raises(RuntimeError):
        collect_jsonl(crashing(), path)
    assert path.read_text() == '{"step": 1}\n'


def test_collect_pd():
    pd = pytest.importorskip("pandas")
    frame = collect_pd([{"step": 1, "loss": torch.tensor(0.5), "model": None}, {"step": 2, "loss": 0.25}])
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["step", "loss"] and frame["loss"].tolist() == [0.5, 0.25]


def test_evaluate_shares_one_forward_restores_modes_and_validation_loss():
    x, y = _data(32)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    calls = []
    original = model.forward
    model.forward = lambda *a: calls.append(1) or original(*a)
    metrics = {"mse": nn.MSELoss(), "mae": lambda p, t: float((p - t).abs().mean())}
    result = evaluate((x, y), metrics=metrics)({"model": model})
    assert len(calls) == 1 and set(result) == {"mse", "mae"} and all(isinstance(v, float) for v in result.values())
    with torch.no_grad():
        model.eval()
        expected = nn.functional.mse_loss(original(x), y).item()
    model.train()
    model[1].eval()
    assert result["mse"] == pytest.approx(expected)
    assert validation_loss((x, y), nn.MSELoss())({"model": model}) == {"val_loss": pytest.approx(expected)}
    assert [m.training for m in model.modules()] == [True, True, False, True]

    def failing(p, t):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        evaluate((x, y), metrics={"bad": failing})({"model": model})
    assert [m.training for m in model.modules()] == [True, True, False, True]
    mean = evaluate((x,), metrics={"mean": lambda p: p.mean()}, last_label=False)({"model": model})["mean"]
    assert mean == pytest.approx(float(original(x).mean().detach()), abs=1.0)


def test_evaluate_rejects_bad_arguments():
    x, y = _data(4)
    with pytest.raises(ValueError, match="at least one tensor"):
        evaluate((), metrics={"a": nn.MSELoss()})
    with pytest.raises(ValueError, match="last_label=True requires at least two"):
        evaluate((x,), metrics={"a": nn.MSELoss()})
    with pytest.raises(ValueError, match="at least one metric"):
        evaluate((x, y), metrics={})
    augmenter = evaluate((x, y), metrics={"a": 3})  # as in fitstream: found when evaluated
    with pytest.raises(TypeError, match=r"'int' object is not callable. Got metrics\['a'\]=3"):
        augmenter({"model": nn.Linear(3, 1)})
    with pytest.raises(KeyError, match="'model'"):
        validation_loss((x, y), nn.MSELoss())({"step": 1})
    with pytest.raises(TypeError, match="'model' key with a torch.nn.Module. Got NoneType"):
        validation_loss((x, y), nn.MSELoss())({"model": None})


def test_best_model_keeps_the_best_state_and_loads_it():
    model = _model()
    best = best_model("val", device="cpu")
    states = {}
    for step, val in [(1, 3.0), (2, 1.0), (3, 1.0), (4, 2.0)]:  # a tie keeps the earlier copy
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        states[step] = flat_params(model).clone()
        best({"model": model, "val": val, "step": step})
    assert best.best == 1.0 and best.best_event == {"val": 1.0, "step": 2}
    params = list(model.parameters())
    best.load_into(model)
    assert torch.equal(flat_params(model), states[2])
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))  # same objects, updated in place
    with pytest.raises(ValueError, match="Metric 'val' must be finite. Got nan"):
        best({"model": model, "val": math.nan})
    with pytest.raises(RuntimeError, match="No model state has been captured yet"):
        BestModel("val", "min", None).load_into(model)
    with pytest.raises(ValueError, match="direction"):
        best_model("val", direction="up")


def test_live_plot_records_every_event_and_closes_its_figure(capsys):
    pytest.importorskip("IPython")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [{"step": i, "loss": 1.0 / i, "val": math.nan if i == 2 else 2.0 / i} for i in range(1, 6)]
    with live_plot("loss", "val", min_interval=0) as plot:
        out = list(pipe(events, plot))
    assert out == events and plot.steps == [1, 2, 3, 4, 5]
    assert math.isnan(plot.values["val"][1]) and plot.values["loss"][4] == pytest.approx(0.2)
    assert plt.get_fignums() == []  # the figure it created is closed
    with pytest.raises(RuntimeError, match="inside its 'with' context"):
        list(plot(events))
    with pytest.raises(RuntimeError, match="Create a new live_plot context"):
        plot.__enter__()
    fig, ax = plt.subplots()
    with live_plot("loss", ax=ax) as plot:
        list(plot(events))
    assert len(ax.lines) == 1 and plt.get_fignums() == [fig.number]  # your axes stay open
    plt.close(fig)
    for bad in ((), ("a", "a"), ("",)):
        with pytest.raises(ValueError):
            live_plot(*bad)
    with pytest.raises(ValueError, match="min_interval"):
        live_plot("a", min_interval=-1)


# --------------------------------------------------------------------------- fitstream side by side


def _fitstream():
    return pytest.importorskip("fitstream", reason="fitstream is not installed (make test installs it)")


def test_same_names_and_signatures_as_fitstream():
    fitstream = _fitstream()
    for name in FITSTREAM_NAMES:
        theirs, ours = getattr(fitstream, name), getattr(stream, name)
        if name == "Event":
            assert issubclass(ours, dict)
            continue
        ours_params = list(inspect.signature(ours).parameters.values())
        theirs_params = list(inspect.signature(theirs).parameters.values())
        assert [(p.name, p.kind, p.default) for p in ours_params] == [
            (p.name, p.kind, p.default) for p in theirs_params
        ], name


def test_same_results_as_fitstream_on_one_pipeline(capsys):
    fitstream = _fitstream()
    x, y = _data(96, seed=1)
    xv, yv = _data(32, seed=2)

    def run(lib):
        model = _model(seed=3)
        best = lib.best_model("val_loss")
        events = lib.pipe(
            lib.epoch_stream((x, y), model, torch.optim.SGD(model.parameters(), lr=0.05), nn.MSELoss(), batch_size=10,
                             generator=torch.Generator().manual_seed(4), extra={"tag": "t"}),
            lib.augment(lib.validation_loss((xv, yv), nn.MSELoss())),
            lib.augment(lib.evaluate((xv, yv), metrics={"mae": lambda p, t: (p - t).abs().mean()})),
            lib.ema("val_loss", half_life=3),
            lib.tap(lib.print_keys("train_loss", "val_loss_ema", "tag", precision=5), every=2),
            lib.tap(best),
            lib.early_stop("val_loss", patience=3, min_delta=1e-3),
            lib.take(40),
        )
        out = io.StringIO()
        lib.collect_jsonl(events, out, exclude=["train_time_sec"])
        best.load_into(model)
        return out.getvalue(), flat_params(model), capsys.readouterr().out

    ours, theirs = run(stream), run(fitstream)
    assert ours[0] == theirs[0] and ours[0].count("\n") > 5  # identical events, bit for bit
    assert torch.equal(ours[1], theirs[1])
    assert ours[2] == theirs[2]


# --------------------------------------------------------------------------- trainer.events()


class Recorder(BaseHook):
    def __init__(self):
        self.calls = []

    def on_before_train(self, trainer):
        self.calls.append("before")

    def on_after_step(self, trainer):
        self.calls.append(trainer.step)

    def on_after_train(self, trainer):
        self.calls.append("after")

    def on_exception(self, trainer, error):
        self.calls.append(f"exception {type(error).__name__}")


def test_trainer_events_are_the_steps_of_train_with_hooks_running(tmp_path):
    batches = regression_batches(6, 8)
    reference = make_trainer(batches, max_steps=9)
    reference.train()
    recorder = Recorder()
    trainer = make_trainer(batches, hooks=[recorder, LoggingHook(interval=3)], workspace=tmp_path)
    events = list(trainer.events(steps=9))
    assert [e["step"] for e in events] == list(range(1, 10))
    assert [e["epoch"] for e in events] == [0] * 6 + [1] * 3
    first = events[0]
    assert {"loss", "records", "grad_norm", "lr", "data_time", "step_time", "retries", "model", "trainer"} <= set(first)
    assert isinstance(first["loss"], torch.Tensor) and first["model"] is trainer.model and first["trainer"] is trainer
    assert torch.equal(flat_params(trainer.model), flat_params(reference.model))
    assert recorder.calls == ["before", *range(1, 10), "after"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [3, 6, 9]
    assert trainer.max_steps is None  # like fit(): relative limits are not kept


def test_a_stage_that_stops_the_stream_ends_training_with_a_final_checkpoint(tmp_path):
    recorder = Recorder()
    hook = CheckpointingHook(interval=100, path="ckpt")
    trainer = make_trainer(regression_batches(4, 8), hooks=[recorder, hook], workspace=tmp_path)
    rows = collect(pipe(trainer.events(), take(5)))  # no limit at all: the stream decides
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and isinstance(rows[0]["loss"], float)
    assert recorder.calls == ["before", 1, 2, 3, 4, 5, "after"]  # step 6 never ran
    assert (tmp_path / "ckpt" / "step_000000005").is_dir()
    # The run continues from there with a new stream (or train()).
    resumed = make_trainer(regression_batches(4, 8), hooks=[CheckpointingHook(interval=100, path="ckpt")],
                           workspace=tmp_path)
    assert [e["step"] for e in resumed.events(steps=2)] == [6, 7]


def test_early_stop_and_collect_jsonl_on_trainer_events(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = x @ torch.randn(4, 1)
    xv, yv = x[:64], y[:64]
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    recorder = Recorder()
    trainer = make_trainer(batches, lr=0.05, hooks=[recorder])
    path = tmp_path / "events.jsonl"
    collect_jsonl(
        pipe(
            trainer.events(steps=10_000),
            tap(lambda e: None, every=50),
            augment(validation_loss((xv, yv), nn.MSELoss())),
            early_stop("val_loss", patience=5, min_delta=1e-4),
        ),
        path,
        include=["step", "loss", "val_loss", "records"],
    )
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert 20 < len(lines) < 10_000 and lines[-1]["step"] == trainer.step == len(lines)
    assert recorder.calls[-1] == "after" and recorder.calls[-2] == trainer.step
    assert isinstance(lines[0]["loss"], float) and set(lines[0]["records"]) == {"mae"}
    assert lines[-1]["val_loss"] < 0.05 * lines[0]["val_loss"]


def test_an_error_in_the_with_block_reaches_the_hooks_as_the_runs_error():
    recorder = Recorder()
    trainer = make_trainer(regression_batches(4, 8), hooks=[recorder])
    with pytest.raises(KeyError):
        with trainer.events() as events:
            for event in events:
                if event["step"] == 3:
                    raise KeyError("consumer bug")
    assert recorder.calls == ["before", 1, 2, 3, "exception KeyError"]
    # An ordinary exit from the block ends the run normally.
    recorder.calls.clear()
    with trainer.events() as events:
        next(events)
    assert recorder.calls == ["before", 4, "after"]
    with pytest.raises(StopIteration):
        next(events)


def test_trainer_events_validate_limits():
    trainer = make_trainer(regression_batches(2, 4))
    with pytest.raises(ValueError, match="steps"):
        trainer.events(steps=0)
    with pytest.raises(TypeError, match="epochs"):
        trainer.events(epochs="2")


def test_events_of_a_strategy_carry_its_records():
    from mini_trainer.strategies.phase import PhaseConfig, PhaseTrainer

    model = _model()
    trainer = PhaseTrainer(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=[(x, y) for x, y in [_data(16, seed=s) for s in range(4)]],
        forward_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
        phase=PhaseConfig(warmup_steps=2, full_steps=2, predict_steps=3, correct_every=2),
        device="cpu",
    )
    rows = collect(pipe(trainer.events(), take(12)), include=["step", "records"])
    phases = [r["records"]["phase"] for r in rows]
    assert len(rows) == 12 and {"backward", "speedup"} <= set(phases[-1])
    assert min(p["backward"] for p in phases) == 0.0  # some steps were predicted


def test_trainer_events_add_no_host_sync(monkeypatch):
    from pathlib import Path

    import mini_trainer

    package = str(Path(mini_trainer.__file__).parent)
    reads = []
    for name in ("item", "__float__", "__int__", "__bool__", "cpu", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    trainer = make_trainer(regression_batches(4, 8), max_non_finite_grad_retries=None)
    events = list(pipe(trainer.events(), augment(lambda e: {"twice": e["loss"] * 2}), take(6)))
    assert reads == [] and len(events) == 6


def test_the_readme_stream_examples_run(tmp_path, monkeypatch, capsys):
    """The code blocks of the stream guide (docs/stream.md; before it, the README's stream
    section), run as they are written."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    guide = root / "docs" / "stream.md"
    if guide.exists():
        section = guide.read_text()
    else:
        section = (root / "README.md").read_text().split("## Training as a stream of events", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    X, y = torch.randn(200, 3), torch.randint(0, 2, (200,))
    X_val, y_val = X[:50], y[:50]
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))
    namespace = {
        "nn": nn, "torch": torch, "X": X, "y": y, "X_val": X_val, "y_val": y_val, "model": model,
        "optimizer": torch.optim.Adam(model.parameters(), lr=1e-2),
        "opt": torch.optim.Adam(model.parameters(), lr=1e-2),
        "accuracy": lambda p, t: (p.argmax(1) == t).float().mean(),
        "loader": [(X[i : i + 20], y[i : i + 20]) for i in range(0, 200, 20)],
        "forward_fn": lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]),
    }
    exec("from mini_trainer import BaseTrainer, LoggingHook, CheckpointingHook\n"
         "from mini_trainer.stream import collect_jsonl, pipe, augment, validation_loss, early_stop", namespace)
    exec(blocks[0], namespace)
    assert 1 <= len(namespace["history"]) <= 100 and "val_acc" in namespace["history"][0]
    exec(blocks[1], namespace)
    lines = (tmp_path / "runs" / "a" / "events.jsonl").read_text().splitlines()
    assert lines and set(json.loads(lines[0])) == {"step", "loss", "val_loss"}
    assert namespace["trainer"].step == json.loads(lines[-1])["step"]


# --------------------------------------------------------------------------- how a run ends


class FailingEnd(BaseHook):
    """Raises what a failed final save or a preemption exit raises at the end of a run."""

    priority = {"on_after_train": 200, "default": 0}

    def __init__(self, error):
        self.error = error

    def on_after_train(self, trainer):
        raise self.error


@pytest.mark.parametrize("stop", ["take", "early_stop", "own stage then take"])
def test_a_stage_that_stops_the_stream_ends_the_run_in_the_consumers_frame(stop):
    """What on_after_train raises (a failed final checkpoint, the exit code of a preemption
    save) must reach the caller, not be lost at garbage collection."""
    recorder = Recorder()
    trainer = make_trainer(regression_batches(4, 8), hooks=[recorder, FailingEnd(SystemExit(143))])
    stages = {
        "take": [take(3)],
        "early_stop": [augment(lambda e: {"flat": 1.0}), early_stop("flat", patience=2)],
        "own stage then take": [lambda events: (e for e in events if e["step"] % 2), take(2)],
    }[stop]
    events = trainer.events()  # held in a variable: garbage collection would not end the run
    with pytest.raises(SystemExit) as raised:
        collect(pipe(events, *stages))
    assert raised.value.code == 143
    assert recorder.calls[-1] == "after" and recorder.calls[-2] == 3
    assert trainer.step == 3 and not trainer._running


def test_an_error_in_a_stage_ends_the_run_through_on_exception():
    recorder = Recorder()
    trainer = make_trainer(regression_batches(4, 8), hooks=[recorder])
    events = trainer.events()

    def bad(event):
        if event["step"] == 2:
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        for _ in pipe(events, tap(bad), augment(lambda e: {"x": 1})):
            pass
    assert recorder.calls == ["before", 1, 2, "exception ZeroDivisionError"]
    assert [e["step"] for e in trainer.events(steps=2)] == [3, 4]  # the trainer is free again


def test_a_value_collect_jsonl_cannot_write_ends_the_run_through_on_exception():
    recorder = Recorder()
    trainer = make_trainer(regression_batches(4, 8), hooks=[recorder])
    with pytest.raises(TypeError, match="JSON serializable"):
        collect_jsonl(pipe(trainer.events(), augment(lambda e: {"bad": object()})), io.StringIO())
    assert recorder.calls == ["before", 1, "exception TypeError"]


def test_an_unfinished_stream_keeps_the_trainer_from_starting_another_run():
    trainer = make_trainer(regression_batches(4, 8), max_steps=100)
    events = trainer.events(steps=50)
    next(events)
    for start in (trainer.train, lambda: trainer.fit(steps=2), trainer.events):
        with pytest.raises(RuntimeError, match="still in a run"):
            start()
    assert trainer.step == 1
    events.close()
    assert trainer.max_steps == 100  # the stream's relative limit is gone with it
    assert trainer.fit(steps=2)["step"] == 3


def test_no_event_without_a_step_when_a_loader_without_length_runs_dry():
    class NoLength:
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)

    trainer = make_trainer(NoLength(regression_batches(3, 8)))
    events = list(pipe(trainer.events(epochs=1), ema("loss", decay=0.5)))
    assert [e["step"] for e in events] == [1, 2, 3] and all("loss_ema" in e for e in events)


def test_a_build_failure_leaves_no_relative_limit_behind():
    class FlakyBuild(type(make_trainer(regression_batches(1, 1)))):
        failures = 1

        def build_optimizer(self):
            if FlakyBuild.failures:
                FlakyBuild.failures -= 1
                raise OSError("transient")
            return super().build_optimizer()

    model = nn.Linear(4, 1)
    trainer = FlakyBuild(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         data_loader=regression_batches(2, 4),
                         forward_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), device="cpu")
    with pytest.raises(OSError):
        next(trainer.events(steps=5))
    with pytest.raises(ValueError, match="needs a limit"):
        trainer.train()


def test_take_leaves_other_sources_open_like_fitstream():
    x, y = _data(16)
    model = _model()
    events = epoch_stream((x, y), model, torch.optim.SGD(model.parameters(), lr=0.01), nn.MSELoss(), batch_size=8)
    assert [e["step"] for e in take(2)(events)] == [1, 2]
    assert [e["step"] for e in take(2)(events)] == [3, 4]  # "train 2 more epochs"


def test_collect_reads_tensors_in_batches_and_keeps_containers(monkeypatch):
    from collections import OrderedDict, namedtuple

    monkeypatch.setattr(stream.sinks, "_READ_EVERY", 2)
    Pair = namedtuple("Pair", "a b")
    held = []

    def source():
        for i in range(5):
            event = {"step": i, "loss": torch.tensor(float(i)), "pair": Pair(torch.tensor(1.0), "x"),
                     "od": OrderedDict(k=1)}
            held.append(event)
            yield event

    rows = collect(source())
    assert [r["loss"] for r in rows] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert rows[0]["pair"] == Pair(1.0, "x") and type(rows[0]["pair"]) is Pair
    assert rows[0]["od"] is held[0]["od"]  # nothing to convert: the same object


def test_numpy_integers_falsy_augments_and_odd_steps_are_accepted_like_fitstream(capsys):
    np = pytest.importorskip("numpy")
    assert len(list(take(np.int64(2))([{"a": 1}] * 5))) == 2
    assert len(list(tap(print, every=np.int64(3))([]))) == 0
    print_keys("a", precision=np.int64(1))({"step": math.inf, "a": 1.25})
    assert capsys.readouterr().out == "step=inf a=1.2\n"
    assert list(augment(lambda e: [])([{"a": 1}])) == [{"a": 1}]
    assert len(list(early_stop(0, patience=1)([{0: 1.0}, {0: 2.0}, {0: 3.0}]))) == 2
