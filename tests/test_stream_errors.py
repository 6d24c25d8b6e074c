"""mini_trainer.stream raises what fitstream 0.4.1 raises, when it raises it: side by side
with the real package, for every function both export and each kind of bad input.

Each case is one line: `lib` is either package. The two must agree on
- the exception type (exactly),
- its timing: at the call, or on the first `next()` of what the call returned (a generator
  or a stage's output), and how many events a sink pulled before raising,
- its message: fitstream's text is contained in ours (ours may add the argument, the value
  and what is allowed: see docs/stream.md, "Errors").
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import mini_trainer.stream as stream

fitstream = pytest.importorskip("fitstream", reason="fitstream is not installed (make test installs it)")

X = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
Y = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))
PULLED: list[int] = []


def events(*dicts):
    """A source that records how many events were pulled from it."""
    for event in dicts:
        PULLED.append(1)
        yield event


def model():
    return nn.Linear(3, 1)


def sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.01)


def train(lib, data=(X, Y), **kwargs):
    m = model()
    return lib.epoch_stream(data, m, sgd(m), nn.MSELoss(), **kwargs)


def outcome(thunk):
    """(when, type, message, events pulled): when is "call", "next" (the first next() of
    the returned iterator) or "ok"."""
    PULLED.clear()
    try:
        result = thunk()
    except Exception as error:
        return "call", type(error), _text(error), len(PULLED)
    if isinstance(result, Iterator):
        try:
            next(result)
        except StopIteration:
            pass
        except Exception as error:
            return "next", type(error), _text(error), len(PULLED)
    return "ok", None, "", len(PULLED)


def _text(error):
    # Python names a class by its module in some messages ("fitstream.events.Event() got
    # multiple values..."): compare without it.
    return str(error).replace("fitstream.events.", "").replace("mini_trainer.stream.events.", "")


def good(m=None):
    return {"model": m or model(), "step": 1, "v": 1.0}


# (case id, thunk of lib). Each case must fail with fitstream (checked), and fail the same
# way with ours.
CASES = [
    # iter_batches: a generator, everything is raised on the first next()
    ("iter_batches batch_size=0", lambda L: L.iter_batches(X, batch_size=0)),
    ("iter_batches batch_size=0 no shuffle", lambda L: L.iter_batches(X, batch_size=0, shuffle=False)),
    ("iter_batches batch_size=-1", lambda L: L.iter_batches(X, batch_size=-1)),
    ("iter_batches batch_size=-1 no shuffle", lambda L: L.iter_batches(X, batch_size=-1, shuffle=False)),
    ("iter_batches batch_size=1.5", lambda L: L.iter_batches(X, batch_size=1.5)),
    ("iter_batches batch_size=1.5 no shuffle", lambda L: L.iter_batches(X, batch_size=1.5, shuffle=False)),
    ("iter_batches batch_size='2'", lambda L: L.iter_batches(X, batch_size="2")),
    ("iter_batches batch_size=None", lambda L: L.iter_batches(X, batch_size=None)),
    ("iter_batches a list", lambda L: L.iter_batches([1.0, 2.0])),
    ("iter_batches a 0-d tensor", lambda L: L.iter_batches(torch.tensor(1.0))),
    ("iter_batches generator=3", lambda L: L.iter_batches(X, generator=3)),
    # epoch_stream: a generator too
    ("epoch_stream batch_size=0", lambda L: train(L, batch_size=0)),
    ("epoch_stream batch_size=-1", lambda L: train(L, batch_size=-1)),
    ("epoch_stream batch_size='2'", lambda L: train(L, batch_size="2")),
    ("epoch_stream batch_size=None", lambda L: train(L, batch_size=None)),
    ("epoch_stream batch_size=1.5", lambda L: train(L, batch_size=1.5)),
    ("epoch_stream train_data=()", lambda L: train(L, data=())),
    ("epoch_stream train_data=None", lambda L: train(L, data=None)),
    ("epoch_stream one tensor, last_label", lambda L: train(L, data=(X,))),
    ("epoch_stream step_offset=1.5", lambda L: train(L, step_offset=1.5)),
    ("epoch_stream step_offset='1'", lambda L: train(L, step_offset="1")),
    ("epoch_stream extra=[1]", lambda L: train(L, extra=[1])),
    ("epoch_stream extra={1: 2}", lambda L: train(L, extra={1: 2})),
    ("epoch_stream extra with 'step'", lambda L: train(L, extra={"step": 2})),
    ("epoch_stream a list as data", lambda L: train(L, data=([[1.0]] * 8, Y))),
    ("epoch_stream model=None", lambda L: L.epoch_stream((X, Y), None, sgd(model()), nn.MSELoss())),
    ("epoch_stream optimizer=None", lambda L: L.epoch_stream((X, Y), model(), None, nn.MSELoss())),
    ("epoch_stream loss_fn=None", lambda L: L.epoch_stream((X, Y), (m := model()), sgd(m), None)),
    ("epoch_stream wrong input width", lambda L: train(L, data=(torch.randn(8, 2), Y))),
    # pipe
    ("pipe stage=3", lambda L: L.pipe([], 3)),
    ("pipe stage=None after a stage", lambda L: L.pipe([], L.augment(dict), None)),
    # augment: fn is only called on an event
    ("augment fn=3", lambda L: L.augment(3)(events({"a": 1}))),
    ("augment fn=None", lambda L: L.augment(None)(events({"a": 1}))),
    ("augment returns a list", lambda L: L.augment(lambda e: [1])(events({"a": 1}))),
    ("augment returns 5", lambda L: L.augment(lambda e: 5)(events({"a": 1}))),
    ("augment fn raises KeyError", lambda L: L.augment(lambda e: {"b": e["missing"]})(events({"a": 1}))),
    # take
    ("take n=-1", lambda L: L.take(-1)),
    ("take n=-0.5", lambda L: L.take(-0.5)),
    ("take n=2.5", lambda L: L.take(2.5)(events({"a": 1}))),
    ("take n='2'", lambda L: L.take("2")),
    ("take n=None", lambda L: L.take(None)),
    # tap, tick
    ("tap fn=3", lambda L: L.tap(3)),
    ("tap fn=None", lambda L: L.tap(None)),
    ("tap every=0", lambda L: L.tap(print, every=0)),
    ("tap every=-1", lambda L: L.tap(print, every=-1)),
    ("tap every='2'", lambda L: L.tap(print, every="2")),
    ("tap every=None", lambda L: L.tap(print, every=None)),
    ("tap start=0", lambda L: L.tap(print, start=0)),
    ("tap start='1'", lambda L: L.tap(print, start="1")),
    ("tap start=None", lambda L: L.tap(print, start=None)),
    ("tap fn raises", lambda L: L.tap(lambda e: e["missing"])(events({"a": 1}))),
    ("tick fn=3", lambda L: L.tick(3)),
    ("tick fn=None", lambda L: L.tick(None)),
    ("tick fn takes an argument", lambda L: L.tick(lambda e: None)(events({"a": 1}))),
    # print_keys
    ("print_keys precision=-1", lambda L: L.print_keys("a", precision=-1)),
    ("print_keys precision='2'", lambda L: L.print_keys("a", precision="2")),
    ("print_keys precision=None", lambda L: L.print_keys("a", precision=None)),
    ("print_keys precision=1.5", lambda L: L.print_keys("a", precision=1.5)({"a": 1.0})),
    ("print_keys no key, no step", lambda L: L.print_keys(include_step=False)),
    # ema
    ("ema neither decay nor half_life", lambda L: L.ema("v")),
    ("ema both", lambda L: L.ema("v", decay=0.5, half_life=1.0)),
    ("ema decay=0", lambda L: L.ema("v", decay=0.0)),
    ("ema decay=1", lambda L: L.ema("v", decay=1.0)),
    ("ema decay=-0.5", lambda L: L.ema("v", decay=-0.5)),
    ("ema decay=nan", lambda L: L.ema("v", decay=math.nan)),
    ("ema decay='0.5'", lambda L: L.ema("v", decay="0.5")),
    ("ema half_life=0", lambda L: L.ema("v", half_life=0.0)),
    ("ema half_life=-1", lambda L: L.ema("v", half_life=-1)),
    ("ema half_life=nan", lambda L: L.ema("v", half_life=math.nan)),
    ("ema half_life=inf", lambda L: L.ema("v", half_life=math.inf)),
    ("ema half_life='2'", lambda L: L.ema("v", half_life="2")),
    ("ema missing key", lambda L: L.ema("v", decay=0.5)(events({"w": 1.0}))),
    ("ema value 'abc'", lambda L: L.ema("v", decay=0.5)(events({"v": "abc"}))),
    ("ema value None", lambda L: L.ema("v", decay=0.5)(events({"v": None}))),
    ("ema value a 2-element tensor", lambda L: L.ema("v", decay=0.5)(events({"v": torch.ones(2)}))),
    # early_stop
    ("early_stop patience=0", lambda L: L.early_stop("v", 0)),
    ("early_stop patience=-1", lambda L: L.early_stop("v", -1)),
    ("early_stop patience='2'", lambda L: L.early_stop("v", "2")),
    ("early_stop patience=None", lambda L: L.early_stop("v", None)),
    ("early_stop patience=0.5", lambda L: L.early_stop("v", 0.5)),
    ("early_stop mode='up'", lambda L: L.early_stop("v", 2, mode="up")),
    ("early_stop mode=None", lambda L: L.early_stop("v", 2, mode=None)),
    ("early_stop min_delta=-1", lambda L: L.early_stop("v", 2, min_delta=-1)),
    ("early_stop min_delta='0'", lambda L: L.early_stop("v", 2, min_delta="0")),
    ("early_stop min_delta=None", lambda L: L.early_stop("v", 2, min_delta=None)),
    ("early_stop missing key", lambda L: L.early_stop("v", 2)(events({"w": 1.0}))),
    ("early_stop value 'abc'", lambda L: L.early_stop("v", 2)(events({"v": "abc"}))),
    # collect, collect_jsonl, collect_pd: include and exclude are checked on the first event
    ("collect include and exclude", lambda L: L.collect(events({"a": 1}), include=["a"], exclude=["b"])),
    ("collect events=None", lambda L: L.collect(None)),
    ("collect events=3", lambda L: L.collect(3)),
    ("collect a non-dict event", lambda L: L.collect(events([1, 2]))),
    ("collect_jsonl include and exclude",
     lambda L: L.collect_jsonl(events({"a": 1}), io.StringIO(), include=["a"], exclude=["b"])),
    ("collect_jsonl dest=3", lambda L: L.collect_jsonl(events({"a": 1}), 3)),
    ("collect_jsonl dest=None", lambda L: L.collect_jsonl(events({"a": 1}), None)),
    ("collect_jsonl not serializable", lambda L: L.collect_jsonl(events({"a": object()}), io.StringIO())),
    ("collect_jsonl events=None", lambda L: L.collect_jsonl(None, io.StringIO())),
    ("collect_pd include and exclude", lambda L: L.collect_pd(events({"a": 1}), include=["a"], exclude=["b"])),
    ("collect_pd events=None", lambda L: L.collect_pd(None)),
    # evaluate, validation_loss: arguments at the call, the event and the metrics at each call
    ("evaluate val_data=()", lambda L: L.evaluate((), metrics={"a": nn.MSELoss()})),
    ("evaluate val_data=None", lambda L: L.evaluate(None, metrics={"a": nn.MSELoss()})),
    ("evaluate one tensor, last_label", lambda L: L.evaluate((X,), metrics={"a": nn.MSELoss()})),
    ("evaluate metrics={}", lambda L: L.evaluate((X, Y), metrics={})),
    ("evaluate metrics=None", lambda L: L.evaluate((X, Y), metrics=None)),
    ("evaluate metrics=[1]", lambda L: L.evaluate((X, Y), metrics=[1])),
    ("evaluate a metric that is 3", lambda L: L.evaluate((X, Y), metrics={"a": 3})(good())),
    ("evaluate no 'model' in the event", lambda L: L.evaluate((X, Y), metrics={"a": nn.MSELoss()})({"step": 1})),
    ("evaluate model=None", lambda L: L.evaluate((X, Y), metrics={"a": nn.MSELoss()})({"model": None})),
    ("evaluate model is a function", lambda L: L.evaluate((X, Y), metrics={"a": nn.MSELoss()})({"model": abs})),
    ("evaluate event=None", lambda L: L.evaluate((X, Y), metrics={"a": nn.MSELoss()})(None)),
    ("evaluate metric returns 2 values", lambda L: L.evaluate((X, Y), metrics={"a": lambda p, t: p[:2]})(good())),
    ("evaluate metric returns 'abc'", lambda L: L.evaluate((X, Y), metrics={"a": lambda p, t: "abc"})(good())),
    ("evaluate metric returns None", lambda L: L.evaluate((X, Y), metrics={"a": lambda p, t: None})(good())),
    ("evaluate a bad metric before a failing one",
     lambda L: L.evaluate((X, Y), metrics={"a": lambda p, t: None, "b": lambda p, t: 1 / 0})(good())),
    ("evaluate wrong input width", lambda L: L.evaluate((torch.randn(4, 2), Y), metrics={"a": nn.MSELoss()})(good())),
    ("validation_loss val_data=()", lambda L: L.validation_loss((), nn.MSELoss())),
    ("validation_loss one tensor", lambda L: L.validation_loss((X,), nn.MSELoss())),
    ("validation_loss loss_fn=None", lambda L: L.validation_loss((X, Y), None)(good())),
    ("validation_loss no 'model'", lambda L: L.validation_loss((X, Y), nn.MSELoss())({"step": 1})),
    ("validation_loss model=None", lambda L: L.validation_loss((X, Y), nn.MSELoss())({"model": None})),
    ("validation_loss labels of a wrong shape",
     lambda L: L.validation_loss((X, Y.long()), nn.CrossEntropyLoss())(good())),
    # best_model, BestModel
    ("best_model direction='up'", lambda L: L.best_model("v", direction="up")),
    ("best_model direction=None", lambda L: L.best_model("v", direction=None)),
    ("BestModel direction='up'", lambda L: L.BestModel("v", "up", None)),
    ("best_model metric nan", lambda L: L.best_model("v")(good() | {"v": math.nan})),
    ("best_model metric inf", lambda L: L.best_model("v")(good() | {"v": math.inf})),
    ("best_model metric 'abc'", lambda L: L.best_model("v")(good() | {"v": "abc"})),
    ("best_model metric None", lambda L: L.best_model("v")(good() | {"v": None})),
    ("best_model metric missing", lambda L: L.best_model("v")({"model": model()})),
    ("best_model no 'model'", lambda L: L.best_model("v")({"v": 1.0})),
    ("best_model model=None", lambda L: L.best_model("v")({"v": 1.0, "model": None})),
    ("best_model device='nodevice'", lambda L: L.best_model("v", device="nodevice")(good())),
    ("BestModel.load_into before any event", lambda L: L.best_model("v").load_into(model())),
    ("BestModel.load_into another model", lambda L: _loaded(L.best_model("v"), nn.Linear(2, 1))),
    # live_plot, LivePlot (what needs no matplotlib)
    ("live_plot no key", lambda L: L.live_plot()),
    ("live_plot empty key", lambda L: L.live_plot("")),
    ("live_plot key=1", lambda L: L.live_plot(1)),
    ("live_plot duplicate keys", lambda L: L.live_plot("a", "a")),
    ("live_plot min_interval=-1", lambda L: L.live_plot("a", min_interval=-1)),
    ("live_plot min_interval=nan", lambda L: L.live_plot("a", min_interval=math.nan)),
    ("live_plot min_interval=inf", lambda L: L.live_plot("a", min_interval=math.inf)),
    ("live_plot min_interval='1'", lambda L: L.live_plot("a", min_interval="1")),
    ("live_plot min_interval=None", lambda L: L.live_plot("a", min_interval=None)),
    ("LivePlot keys=[] ", lambda L: L.LivePlot(())),
    ("live_plot used outside its with", lambda L: L.live_plot("a")(events({"step": 1}))),
    ("live_plot refresh outside its with", lambda L: L.live_plot("a").refresh()),
]


def _loaded(best, other):
    best(good())
    best.load_into(other)


@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_same_error_at_the_same_time_as_fitstream(case, capsys):
    theirs, ours = outcome(lambda: case(fitstream)), outcome(lambda: case(stream))
    assert theirs[0] != "ok", f"fitstream raises nothing: {theirs}"
    assert (ours[0], ours[1], ours[3]) == (theirs[0], theirs[1], theirs[3]), (ours, theirs)
    assert theirs[2] in ours[2], (ours[2], theirs[2])


# ---------------------------------------------------------------- where we raise more on purpose

# Bad input that fitstream takes silently (cutting to the shortest tensor, misaligning
# samples, reading a string as a list of one-letter keys): ours raises, at the time
# fitstream raises its own errors for that function. (when, type, message part)
ADDED = [
    ("iter_batches lengths differ",
     lambda L: L.iter_batches(X, Y[:5], shuffle=False), ("next", ValueError, "(8, 3), (5, 1)")),
    ("iter_batches lengths differ, shuffled",
     lambda L: L.iter_batches(X[:5], Y), ("next", ValueError, "first (sample)")),
    ("epoch_stream lengths differ", lambda L: train(L, data=(X[:5], Y)), ("next", ValueError, "train_data must share")),
    ("collect include='a'", lambda L: L.collect(events({"a": 1}), include="a"), ("call", TypeError, "write ['a']")),
    ("collect_jsonl exclude='a'",
     lambda L: L.collect_jsonl(events({"a": 1}), io.StringIO(), exclude="a"), ("call", TypeError, "single string")),
]


def test_shorter_labels_shuffled_raise_index_error_as_in_fitstream():
    # fitstream indexes the labels out of bounds: IndexError, in the first epoch.
    theirs, ours = outcome(lambda: train(fitstream, data=(X, Y[:5]))), outcome(lambda: train(stream, data=(X, Y[:5])))
    assert (theirs[0], theirs[1]) == (ours[0], ours[1]) == ("next", IndexError)
    assert "train_data must share their first (sample) dimension" in ours[2]


@pytest.mark.parametrize("case, expected", [c[1:] for c in ADDED], ids=[c[0] for c in ADDED])
def test_bad_input_fitstream_takes_silently_raises_here(case, expected, capsys):
    assert outcome(lambda: case(fitstream))[0] == "ok"
    when, kind, message, pulled = outcome(lambda: case(stream))
    assert (when, kind) == expected[:2] and expected[2] in message, message
    assert pulled <= 1  # a sink checks its arguments on the first event, as fitstream checks its own


def test_collect_jsonl_creates_the_missing_directory_fitstream_fails_on(tmp_path):
    path = tmp_path / "new" / "run.jsonl"
    with pytest.raises(FileNotFoundError):
        fitstream.collect_jsonl([{"a": 1}], path)
    stream.collect_jsonl([{"a": 1}], path)
    assert path.read_text() == '{"a": 1}\n'


def test_an_empty_stream_raises_nothing_for_bad_include_and_exclude_in_both():
    for lib in (fitstream, stream):
        assert lib.collect([], include=["a"], exclude=["b"]) == []
        assert lib.collect_jsonl(iter([]), 3) is None


# ---------------------------------------------------------------- needing matplotlib, IPython


def _matplotlib():
    pytest.importorskip("IPython")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    return matplotlib


def _entered_twice(lib):
    with lib.live_plot("a") as plot:
        pass
    return plot.__enter__()


def _plotted(lib, *evts):
    with lib.live_plot("a", min_interval=0) as plot:
        list(plot(events(*evts)))


PLOT_CASES = [
    ("live_plot entered twice", _entered_twice),
    ("live_plot event without step", lambda L: _plotted(L, {"a": 1.0})),
    ("live_plot step nan", lambda L: _plotted(L, {"step": math.nan, "a": 1.0})),
    ("live_plot step 'x'", lambda L: _plotted(L, {"step": "x", "a": 1.0})),
    ("live_plot value 'abc'", lambda L: _plotted(L, {"step": 1, "a": "abc"})),
]


@pytest.mark.parametrize("case", [c[1] for c in PLOT_CASES], ids=[c[0] for c in PLOT_CASES])
def test_live_plot_errors_as_in_fitstream(case, capsys):
    _matplotlib()
    theirs, ours = outcome(lambda: case(fitstream)), outcome(lambda: case(stream))
    assert theirs[0] != "ok", f"fitstream raises nothing: {theirs}"
    assert (ours[0], ours[1], ours[3]) == (theirs[0], theirs[1], theirs[3]), (ours, theirs)
    assert theirs[2] in ours[2], (ours[2], theirs[2])


# ---------------------------------------------------------------- missing optional dependencies

MISSING = [
    ("collect_pd without pandas", ("pandas",), lambda L: L.collect_pd(events({"a": 1}))),
    ("live_plot without matplotlib", ("matplotlib", "matplotlib.pyplot"), lambda L: L.live_plot("a").__enter__()),
    ("live_plot without IPython", ("IPython", "IPython.display"), lambda L: L.live_plot("a").__enter__()),
]


@pytest.mark.parametrize("modules, case", [c[1:] for c in MISSING], ids=[c[0] for c in MISSING])
def test_missing_optional_dependency_messages(modules, case, monkeypatch):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)
    theirs, ours = outcome(lambda: case(fitstream)), outcome(lambda: case(stream))
    assert theirs[1] is ImportError
    assert (ours[0], ours[1], ours[3]) == (theirs[0], theirs[1], theirs[3]), (ours, theirs)
    if "fitstream[notebook]" in theirs[2]:  # the install hint names our package instead
        prefix = theirs[2].split(" Install with")[0]
        assert ours[2].startswith(prefix) and "pip install" in ours[2], (ours[2], theirs[2])
    else:
        assert ours[2].startswith(theirs[2]), (ours[2], theirs[2])
