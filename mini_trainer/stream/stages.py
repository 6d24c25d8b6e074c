"""Training as a stream of events, API-compatible with the `fitstream` package.

A training run is an iterable of dicts ("events"); everything else is a function that
transforms, enriches, cuts or consumes that iterable. Switching from fitstream means
changing the import only: the names, signatures, defaults and event keys are the same
(checked against fitstream 0.4.1).

    events = pipe(
        epoch_stream((X, y), model, optimizer, nn.CrossEntropyLoss(), batch_size=32),
        augment(validation_loss((X_val, y_val), nn.CrossEntropyLoss())),
        early_stop("val_loss", patience=10),
    )
    history = collect(events)

What fitstream lacks: `BaseTrainer.events()` turns any trainer (strategies, hooks,
checkpoints, DDP included) into a stream of per-step events, so the same stages work on a
full-featured run. Its events hold the step's loss and metrics as device tensors (reading
them is up to the consumer, so a stream costs no host sync of its own); `collect` and
`collect_jsonl` turn 0-d tensors into Python numbers, and exclude the `trainer` key along
with `model`.

Everything is lazy: a stage pulls one event at a time from the stage before it, so `take(n)`
and `early_stop(...)` end a training run by not asking for more. When they stop, they also
close a `trainer.events()` stream upstream of them, so the run's end (`on_after_train`: the
final checkpoint, a preemption exit code) happens right there, in the consumer's frame, and
an error in any stage reaches the trainer's hooks as the run's error (`on_exception`).
"""

from __future__ import annotations

import functools
import json
import math
import operator
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from copy import deepcopy
from itertools import islice
from pathlib import Path
from typing import IO, Any, Literal, overload

import torch
from torch import nn

from ..plain import to_plain

__all__ = [
    "Event",
    "Transform",
    "TrainerEvents",
    "epoch_stream",
    "iter_batches",
    "pipe",
    "augment",
    "take",
    "tap",
    "tick",
    "print_keys",
    "ema",
    "early_stop",
    "collect",
    "collect_jsonl",
    "collect_pd",
    "evaluate",
    "validation_loss",
    "BestModel",
    "best_model",
    "LivePlot",
    "live_plot",
]

Transform = Callable[[Iterable[dict[str, Any]]], Iterable[dict[str, Any]]]
"""A stream stage: takes an iterable of events, returns one (usually a generator)."""


class Event(dict):
    """One event: a plain dict. The class exists so that type checkers and editors know
    the usual keys (`model`, `step`, `train_loss`, `train_time_sec`)."""

    @overload
    def __getitem__(self, key: Literal["model"]) -> nn.Module: ...
    @overload
    def __getitem__(self, key: Literal["step"]) -> int: ...
    @overload
    def __getitem__(self, key: Literal["train_loss", "train_time_sec"]) -> float: ...
    @overload
    def __getitem__(self, key: str) -> Any: ...

    def __getitem__(self, key: str) -> Any:
        return dict.__getitem__(self, key)


# =========================================================================== sources


def iter_batches(
    *tensors: torch.Tensor,
    batch_size: int = 1,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield aligned batches (tuples, one slice per tensor) along the first dimension.

    The last batch is smaller when the sample count is not a multiple of `batch_size`.
    With `shuffle`, one `torch.randperm` per call orders the samples; pass a seeded
    `generator` for a reproducible order (the permutation is drawn on the generator's
    device and moved to the data's).

    >>> x = torch.arange(10).reshape(5, 2)
    >>> y = torch.arange(5)
    >>> [tuple(b.tolist() for b in batch) for batch in iter_batches(x, y, batch_size=2, shuffle=False)][-1]
    ([[8, 9]], [4])
    """
    _check_positive_int("batch_size", batch_size)
    n = _sample_count(tensors, "tensors") if tensors else 0
    return _batches(tensors, n, batch_size, shuffle, generator)


def _batches(tensors, n, batch_size, shuffle, generator) -> Iterator[tuple[torch.Tensor, ...]]:
    if not tensors:
        return
    if not shuffle:
        yield from zip(*(t.split(batch_size) for t in tensors))
        return
    device = generator.device if generator is not None else tensors[0].device
    order = torch.randperm(n, device=device, generator=generator).to(tensors[0].device)
    for chunk in order.split(batch_size):
        yield tuple(t[chunk] for t in tensors)


def epoch_stream(
    train_data: Sequence[torch.Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    *,
    batch_size: int = 1,
    shuffle: bool = True,
    last_label: bool = True,
    generator: torch.Generator | None = None,
    extra: dict[str, Any] | None = None,
    step_offset: int = 0,
) -> Iterator[Event]:
    """Train on in-memory tensors, one event per epoch, forever (cut it with `take`,
    `early_stop` or `itertools.islice`).

    Args:
        train_data: tensors with the samples along the first dimension. With
            `last_label=True` the last one holds the labels and the others are the model's
            inputs (`model(*inputs)`); otherwise all are inputs.
        model, optimizer: the model to train and an optimizer over its parameters.
        loss_fn: `loss_fn(predictions, labels)`, or `loss_fn(predictions)` without labels;
            it must average over the batch (the epoch loss weights batches by their size).
        batch_size, shuffle, generator: how batches are drawn (see `iter_batches`).
        extra: keys added to every event.
        step_offset: added to the 1-based epoch number in `step` (to continue a count).

    Each event holds `model`, `step` (epoch number), `train_loss` (the epoch's mean loss,
    a float: read once per epoch) and `train_time_sec`. Model and data must already be on
    the same device; the model is put in training mode at the start of every epoch.

    >>> x = torch.tensor([[1.0], [2.0]]); y = torch.tensor([[2.0], [4.0]])
    >>> model = nn.Linear(1, 1, bias=False)
    >>> _ = nn.init.zeros_(model.weight)
    >>> stream = epoch_stream((x, y), model, torch.optim.SGD(model.parameters(), lr=0.0), nn.MSELoss(), batch_size=2)
    >>> event = next(stream)
    >>> event["step"], event["train_loss"]
    (1, 10.0)
    """
    _check_positive_int("batch_size", batch_size)
    if not train_data:
        raise ValueError("train_data must hold at least one tensor; got an empty sequence")
    if last_label and len(train_data) < 2:
        raise ValueError(
            f"train_data holds {len(train_data)} tensor(s) but last_label=True needs at least two "
            "(inputs..., labels); pass last_label=False for label-free losses"
        )
    if not isinstance(step_offset, int) or isinstance(step_offset, bool):
        raise TypeError(f"step_offset must be an int; got {type(step_offset).__name__} {step_offset!r}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict of keys to add to each event; got {type(extra).__name__}")
    _sample_count(train_data, "train_data")
    return _epochs(train_data, model, optimizer, loss_fn, batch_size, shuffle, last_label, generator, dict(extra or {}), step_offset)


def _epochs(train_data, model, optimizer, loss_fn, batch_size, shuffle, last_label, generator, extra, step_offset) -> Iterator[Event]:
    epoch = step_offset
    while True:
        model.train()
        started = time.perf_counter()
        # The epoch loss is summed on the device and read once at the end: no host sync
        # per batch.
        loss_sum = torch.zeros((), device=train_data[0].device)
        samples = 0
        for batch in iter_batches(*train_data, batch_size=batch_size, shuffle=shuffle, generator=generator):
            inputs, labels = (batch[:-1], batch[-1]) if last_label else (batch, None)
            predictions = model(*inputs)
            loss = loss_fn(predictions, labels) if last_label else loss_fn(predictions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            size = inputs[0].shape[0]
            loss_sum += loss.detach() * size
            samples += size
        epoch += 1
        yield Event(
            model=model,
            step=epoch,
            train_loss=(loss_sum / samples).item(),
            train_time_sec=time.perf_counter() - started,
            **extra,
        )


class TrainerEvents:
    """What `BaseTrainer.events()` returns: an iterator of step events that can be closed
    (ending the run like a reached limit) and used as a context manager."""

    def __init__(self, events: Iterator[dict[str, Any]]) -> None:
        self._events = events

    def __iter__(self) -> TrainerEvents:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._events)

    def close(self) -> None:
        """Stop training after the last step taken: `on_after_train` hooks run now."""
        self._events.close()

    def __enter__(self) -> TrainerEvents:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        # An error in the block ends the run as an error raised by a step would: hooks
        # get on_exception (not on_after_train), then the error goes on as it was.
        try:
            self._events.throw(exc)
        except BaseException as raised:
            if raised is not exc:
                raise


class _Stage:
    """What a stage returns: its events, plus the stream it reads (`source`), so that a
    stage that ends the stream can end a training run upstream (`_end_run`), and an error
    raised by any stage reaches that run's hooks (`_abort_run`)."""

    __slots__ = ("source", "_events")

    def __init__(self, source: Iterable[dict[str, Any]], events: Iterator[dict[str, Any]]) -> None:
        self.source = source
        self._events = events

    def __iter__(self) -> _Stage:
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            return next(self._events)
        except StopIteration:
            raise
        except BaseException as error:
            _abort_run(self.source, error)
            raise

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()


def _stage(generator_function: Callable[[Iterable[dict[str, Any]]], Iterator[dict[str, Any]]]) -> Transform:
    """Turn `events -> generator` into a stage whose output remembers its input."""

    @functools.wraps(generator_function)
    def stage(events: Iterable[dict[str, Any]]) -> _Stage:
        return _Stage(events, generator_function(events))

    return stage


def _run_upstream(events: Any) -> TrainerEvents | None:
    while isinstance(events, _Stage):
        events = events.source
    return events if isinstance(events, TrainerEvents) else None


def _end_run(events: Any) -> None:
    """A stage stopped the stream: end the training run it reads from, now, so that what
    `on_after_train` does (or raises) happens here and not at garbage collection. Other
    sources are left open: a fitstream `epoch_stream` can be taken from again."""
    run = _run_upstream(events)
    if run is not None:
        run.close()


def _abort_run(events: Any, error: BaseException) -> None:
    """An error ends the stream: the training run upstream ends with it (`on_exception`)."""
    run = _run_upstream(events)
    if run is not None:
        run.__exit__(type(error), error, error.__traceback__)


# =========================================================================== composing


def pipe(stream: Iterable[dict[str, Any]], *stages: Transform) -> Iterable[dict[str, Any]]:
    """Apply `stages` to `stream` left to right: `pipe(s, f, g)` is `g(f(s))`.

    >>> list(pipe([{"x": 1}, {"x": 2}], augment(lambda e: {"y": 10 * e["x"]}), take(1)))
    [{'x': 1, 'y': 10}]
    """
    for index, stage in enumerate(stages):
        if not callable(stage):
            raise TypeError(f"pipe stages must be callable (stream -> stream); stage {index} is {type(stage).__name__} {stage!r}")
        source, stream = stream, stage(stream)
        if not isinstance(stream, _Stage) and isinstance(stream, Iterator):
            # Your own stage (a generator expression...): keep the chain to the source, so
            # that a later take/early_stop still ends a training run before it.
            stream = _Stage(source, stream)
    return stream


def augment(fn: Callable[[dict[str, Any]], dict[str, Any] | None]) -> Transform:
    """A stage that merges `fn(event)` (a dict, or None for nothing) into each event.

    Events are not modified in place: each yielded event is a new dict `event | extra`.

    >>> stage = augment(lambda e: {"double": 2 * e["x"]} if e["x"] > 1 else None)
    >>> list(stage([{"x": 1}, {"x": 2}]))
    [{'x': 1}, {'x': 2, 'double': 4}]
    """
    if not callable(fn):
        raise TypeError(f"augment needs a callable event -> dict | None; got {type(fn).__name__}")

    @_stage
    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for event in events:
            extra = fn(event) or {}  # None (or anything empty) adds nothing
            if not isinstance(extra, dict):
                raise TypeError(f"the augment function must return a dict or None; it returned {type(extra).__name__}")
            yield event | extra

    return stage


def take(n: int) -> Transform:
    """A stage that yields the first `n` events and stops, never pulling an event more
    (with `n=0` the source is not advanced at all, so no training step runs). Reaching
    `n` ends a `trainer.events()` run upstream; any other source can be taken from again.

    >>> pulled = []
    >>> def source():
    ...     for i in range(100):
    ...         pulled.append(i)
    ...         yield {"step": i}
    >>> list(take(2)(source())), pulled
    ([{'step': 0}, {'step': 1}], [0, 1])
    """
    n = _as_int("take(n): n", n)
    if n < 0:
        raise ValueError(f"take(n): n must be >= 0; got {n}")

    @_stage
    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        taken = 0
        for event in islice(events, n):
            taken += 1
            yield event
        if taken == n:  # cut short, not run dry
            _end_run(events)

    return stage


def tap(fn: Callable[[dict[str, Any]], Any], *, every: int = 1, start: int = 1) -> Transform:
    """A stage that calls `fn(event)` for side effects (printing, saving, plotting) on the
    events numbered `start, start + every, ...` (1-based), and yields every event unchanged.

    >>> seen = []
    >>> _ = list(tap(lambda e: seen.append(e["step"]), every=2, start=2)({"step": s} for s in range(1, 7)))
    >>> seen
    [2, 4, 6]
    """
    if not callable(fn):
        raise TypeError(f"tap needs a callable event -> any; got {type(fn).__name__}")
    every = _check_positive_int("every", every)
    start = _check_positive_int("start", start)

    @_stage
    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for number, event in enumerate(events, start=1):
            if number >= start and (number - start) % every == 0:
                fn(event)
            yield event

    return stage


def tick(fn: Callable[[], Any]) -> Transform:
    """A stage that calls `fn()` (no arguments: a progress bar's `update`, a timer) once
    per event, before passing the event on unchanged."""
    if not callable(fn):
        raise TypeError(f"tick needs a callable with no arguments; got {type(fn).__name__}")

    @_stage
    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for event in events:
            fn()
            yield event

    return stage


def print_keys(*keys: str, precision: int = 4, include_step: bool = True, step_key: str = "step") -> Callable[[dict[str, Any]], None]:
    """A callback for `tap` that prints `keys` of an event on one line.

    Numbers (and one-element tensors) get `precision` digits after the point, booleans
    print as True/False, anything else with `str`; a missing key prints as `key=NA`. The
    step comes first, zero-padded to 4 digits, when `include_step` and the event has it.

    >>> show = print_keys("loss", "ok", precision=2)
    >>> show({"step": 3, "loss": 0.123, "ok": True})
    step=0003 loss=0.12 ok=True
    >>> show({"loss": torch.tensor(1.5)})
    loss=1.50 ok=NA
    """
    precision = _as_int("precision", precision)
    if precision < 0:
        raise ValueError(f"precision must be an int >= 0; got {precision!r}")
    if not keys and not include_step:
        raise ValueError("print_keys needs at least one key when include_step=False")

    def text(value: Any) -> str:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value.detach().cpu().item())
        if isinstance(value, bool):
            return str(value)
        if isinstance(value, (int, float)):
            return f"{float(value):.{precision}f}"
        return str(value)

    def show(event: dict[str, Any]) -> None:
        parts = []
        if include_step and step_key in event:
            step = event[step_key]
            try:
                parts.append(f"{step_key}={int(step):04d}")
            except (TypeError, ValueError, OverflowError):  # not a number, NaN, inf
                parts.append(f"{step_key}={step}")
        parts += [f"{key}={text(event[key])}" if key in event else f"{key}=NA" for key in keys]
        print(" ".join(parts))

    return show


def ema(
    key: str,
    *,
    decay: float | None = None,
    half_life: float | None = None,
    out_key: str | None = None,
    bias_correction: bool = True,
) -> Transform:
    """A stage that adds an exponential moving average of `event[key]` as `out_key`
    (default `"<key>_ema"`).

    Give exactly one of `decay` (in (0, 1)) or `half_life` (events; decay = 2^(-1/half_life)).
    The average starts at 0 and follows m = decay * m + (1 - decay) * x; with
    `bias_correction` it is divided by 1 - decay^t so that early values are not pulled
    towards 0. Every event must have `key`, convertible with `float()` (a tensor is read
    then: a host sync per event).

    >>> smoothed = ema("loss", decay=0.5)([{"loss": 10.0}, {"loss": 20.0}, {"loss": 30.0}])
    >>> [round(e["loss_ema"], 4) for e in smoothed]
    [10.0, 16.6667, 24.2857]
    >>> [e["loss_ema"] for e in ema("loss", decay=0.5, bias_correction=False)([{"loss": 4.0}, {"loss": 4.0}])]
    [2.0, 3.0]
    """
    if (decay is None) == (half_life is None):
        raise ValueError(f"ema needs exactly one of decay or half_life; got decay={decay!r}, half_life={half_life!r}")
    if half_life is not None:
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0; got {half_life!r}")
        decay = 2.0 ** (-1.0 / half_life)
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1); got {decay!r}")
    name = out_key or f"{key}_ema"

    @_stage
    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        average = 0.0
        for t, event in enumerate(events, start=1):
            average = decay * average + (1.0 - decay) * float(event[key])
            # decay**t is what the zero start still weighs in the average.
            yield event | {name: average / (1.0 - decay**t) if bias_correction else average}

    return stage


def early_stop(key: str, patience: int, *, mode: Literal["min", "max"] = "min", min_delta: float = 0.0) -> Transform:
    """A stage that ends the stream once `event[key]` has not improved for `patience`
    events in a row (the last, non-improving event is still yielded; nothing more is
    pulled, so a training source runs no further step).

    `mode="min"`: lower is better; `"max"`: higher is better. An improvement must beat the
    best value so far by more than `min_delta`. (fitstream's first README called it as
    `early_stop(events, key=..., patience=...)`; like fitstream 0.4, this is a stage:
    `early_stop(key="val_loss", patience=10)(events)` or a `pipe` stage.)

    Stopping ends a `trainer.events()` run upstream (see the module docstring).

    >>> values = [5, 4, 4.5, 4.2, 3, 3.5]
    >>> [e["val"] for e in early_stop("val", patience=2)({"val": v} for v in values)]
    [5, 4, 4.5, 4.2]
    """
    patience = _as_int("patience", patience)
    if patience < 1:
        raise ValueError(f"patience must be an int >= 1; got {patience!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max'; got {mode!r}")
    if not min_delta >= 0.0:
        raise ValueError(f"min_delta must be >= 0; got {min_delta!r}")
    sign = 1.0 if mode == "min" else -1.0  # compare as "lower is better"

    @_stage
    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        best = None
        stale = 0
        for event in events:
            value = sign * float(event[key])
            if best is None or value < best - min_delta:
                best, stale = value, 0
            else:
                stale += 1
            yield event
            if stale >= patience:
                _end_run(events)
                return

    return stage


# =========================================================================== sinks


_NEVER_COLLECTED = ("model", "trainer")  # live objects, not metrics


def _select(event: Mapping[str, Any], include: Sequence[str] | None, exclude: Sequence[str] | None) -> dict[str, Any]:
    if include is not None:
        return {k: event[k] for k in include if k in event and k not in _NEVER_COLLECTED}
    dropped = set(_NEVER_COLLECTED).union(exclude or ())
    return {k: v for k, v in event.items() if k not in dropped}


def _check_include_exclude(include: Any, exclude: Any) -> None:
    if include is not None and exclude is not None:
        raise ValueError("give include or exclude, not both")
    for name, keys in (("include", include), ("exclude", exclude)):
        if isinstance(keys, str):
            raise TypeError(f"{name} must be a list of keys, not a single string ({keys!r}); write [{keys!r}]")


_READ_EVERY = 1024  # collect() reads its pending tensors every this many events


def collect(
    events: Iterable[dict[str, Any]],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the stream to its end and return the events as a list of dicts, without
    `model` (and `trainer`), optionally keeping only `include` or dropping `exclude`.

    0-d tensors (a trainer's per-step loss, grad_norm, records) become Python numbers.
    They are read in batches of 1024 events: one host sync per 1024 steps, and device
    memory does not grow with the run's length.

    >>> collect([{"step": 1, "loss": torch.tensor(0.5), "model": None}])
    [{'step': 1, 'loss': 0.5}]
    >>> collect([{"step": 1, "loss": 0.5}], include=["loss", "missing"])
    [{'loss': 0.5}]
    """
    _check_include_exclude(include, exclude)
    rows: list[dict[str, Any]] = []
    done = 0  # rows[:done] hold numbers already
    for event in events:
        rows.append(_select(event, include, exclude))
        if len(rows) - done >= _READ_EVERY:
            rows[done:] = [to_plain(row) for row in rows[done:]]
            done = len(rows)
    rows[done:] = [to_plain(row) for row in rows[done:]]
    return rows


def collect_jsonl(
    events: Iterable[dict[str, Any]],
    dest: str | Path | IO[str],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> None:
    """Write each event as one JSON line to `dest` (a path, overwritten, its directory
    created if missing; or an open text file), as it arrives: a crashed run keeps the lines
    of the events it finished.

    Keys are filtered as in `collect`; 0-d tensors are written as numbers; other values
    must be JSON-serialisable.

    >>> import io
    >>> out = io.StringIO()
    >>> collect_jsonl([{"step": 1, "loss": torch.tensor(0.25), "model": None}], out)
    >>> out.getvalue()
    '{"step": 1, "loss": 0.25}\\n'
    """
    _check_include_exclude(include, exclude)
    if isinstance(dest, (str, Path)):
        # The file is opened before the first event, i.e. before a trainer has created its
        # workspace: a missing parent directory would fail every run that writes there.
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "w", encoding="utf-8") as file:
            _write_jsonl(events, file, include, exclude, flush=True)
    elif callable(getattr(dest, "write", None)):
        _write_jsonl(events, dest, include, exclude, flush=False)
    else:
        raise TypeError(f"dest must be a path or an open text file; got {type(dest).__name__}")


def _write_jsonl(events, file, include, exclude, flush: bool) -> None:
    for event in events:
        try:
            line = json.dumps(to_plain(_select(event, include, exclude)))
        except BaseException as error:  # a value JSON cannot hold: the run ends with the error
            _abort_run(events, error)
            raise
        file.write(line + "\n")
        if flush:
            file.flush()


def collect_pd(
    events: Iterable[dict[str, Any]],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
):
    """`collect`, as a pandas DataFrame with one row per event (needs pandas:
    `pip install pandas`)."""
    try:
        import pandas
    except ImportError as error:
        raise ImportError("collect_pd needs pandas: pip install pandas") from error
    return pandas.DataFrame(collect(events, include=include, exclude=exclude))


# =========================================================================== augmenters


def evaluate(
    val_data: Sequence[torch.Tensor],
    *,
    metrics: Mapping[str, Callable[..., torch.Tensor | float]],
    last_label: bool = True,
) -> Callable[[dict[str, Any]], dict[str, float]]:
    """An augmenter (for `augment`) that computes `metrics` on `val_data` with
    `event["model"]`: one forward pass over the whole set, shared by all metrics.

    Each metric is `fn(predictions, labels)` (or `fn(predictions)` with
    `last_label=False`) returning a number or a one-element tensor; results are floats.
    The model runs in eval mode without gradients; every module's mode is put back after,
    also when a metric raises. Model and data must be on the same device.

    >>> model = nn.Linear(1, 1, bias=False); _ = nn.init.ones_(model.weight)
    >>> x = torch.tensor([[1.0], [2.0]]); y = torch.tensor([[1.0], [3.0]])
    >>> evaluate((x, y), metrics={"mae": lambda p, t: (p - t).abs().mean()})({"model": model})
    {'mae': 0.5}
    """
    if not val_data:
        raise ValueError("val_data must hold at least one tensor; got an empty sequence")
    if last_label and len(val_data) < 2:
        raise ValueError(f"val_data holds {len(val_data)} tensor(s) but last_label=True needs at least two (inputs..., labels)")
    metrics = dict(metrics)
    if not metrics:
        raise ValueError("metrics must name at least one metric function")
    for name, fn in metrics.items():
        if not callable(fn):
            raise TypeError(f"metrics[{name!r}] must be callable (predictions, labels) -> number; got {type(fn).__name__}")
    inputs = tuple(val_data[:-1]) if last_label else tuple(val_data)
    labels = val_data[-1] if last_label else None

    def compute(event: dict[str, Any]) -> dict[str, float]:
        model = event.get("model")
        if not isinstance(model, nn.Module):
            raise TypeError(f"evaluate needs an event with a 'model' (nn.Module); got {type(model).__name__}")
        modes = [(module, module.training) for module in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                predictions = model(*inputs)
                values = {name: fn(predictions, labels) if last_label else fn(predictions) for name, fn in metrics.items()}
        finally:
            for module, training in modes:
                module.training = training
        return {name: float(v.item() if isinstance(v, torch.Tensor) else v) for name, v in values.items()}

    return compute


def validation_loss(
    val_data: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    *,
    key: str = "val_loss",
    last_label: bool = True,
) -> Callable[[dict[str, Any]], dict[str, float]]:
    """An augmenter that adds `loss_fn` on the whole of `val_data` as `key` (see
    `evaluate`)."""
    return evaluate(val_data, metrics={key: loss_fn}, last_label=last_label)


# =========================================================================== best model


class BestModel:
    """A `tap` callback that keeps a copy of the model's state from the event with the
    best `metric_key` so far (strict improvements only: ties keep the earlier copy).

    `device`: where the copies live (None: the model's own devices; "cpu" saves GPU
    memory). After the stream has run, `load_into(model)` puts the best state into a
    model; optimizer and scheduler states are not kept.
    """

    def __init__(self, metric_key: str, direction: Literal["min", "max"], device: str | torch.device | None) -> None:
        if direction not in ("min", "max"):
            raise ValueError(f"direction must be 'min' or 'max'; got {direction!r}")
        self.metric_key = metric_key
        self.direction = direction
        self.device = device
        self.best: float | None = None
        self.best_event: dict[str, Any] | None = None  # the chosen event's metrics (no model)
        self._state: dict[str, Any] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        value = float(event[self.metric_key])
        if not math.isfinite(value):
            raise ValueError(f"BestModel: {self.metric_key}={value} is not finite")
        better = self.best is None or (value < self.best if self.direction == "min" else value > self.best)
        if better:
            self._state = _copy_state(event["model"], self.device)
            self.best = value
            self.best_event = _select(event, None, None)

    def load_into(self, model: nn.Module) -> None:
        """Copy the best state into `model` (its parameters keep their identity, device
        and dtype). Raises RuntimeError before any event was seen."""
        if self._state is None:
            raise RuntimeError(f"BestModel({self.metric_key!r}) has seen no event yet: run the stream first")
        # A deep copy, so that loading twice (or a module mutating its extra state) never
        # changes the kept snapshot.
        model.load_state_dict(deepcopy(self._state))


def _copy_state(model: nn.Module, device: str | torch.device | None) -> dict[str, Any]:
    state = model.state_dict()
    # Tensors are copied straight to `device` (no temporary on the model's device);
    # non-tensor extra state is deep-copied; shared tensors stay shared.
    memo = {id(t): t.detach().to(device=device, copy=True) for t in state.values() if isinstance(t, torch.Tensor)}
    return deepcopy(state, memo)


def best_model(metric_key: str, *, direction: Literal["min", "max"] = "min", device: str | torch.device | None = None) -> BestModel:
    """A `BestModel` tracker: `pipe(events, ..., tap(best := best_model("val_loss")))`,
    then `best.load_into(model)`. Put the tap after the stage that computes the metric.

    >>> model = nn.Linear(1, 1)
    >>> best = best_model("val", direction="max")
    >>> for v, w in [(0.5, 1.0), (0.9, 2.0), (0.7, 3.0)]:
    ...     _ = nn.init.constant_(model.weight, w)
    ...     best({"model": model, "val": v})
    >>> best.load_into(model); model.weight.item()
    2.0
    """
    return BestModel(metric_key, direction, device)


# =========================================================================== live plot


class LivePlot:
    """A stream stage and context manager that draws metrics against `step` in one
    notebook output, updated as events pass (see `live_plot`)."""

    def __init__(self, keys: tuple[str, ...], *, ax: Any = None, min_interval: float = 1.0) -> None:
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"live_plot needs one or more non-empty metric keys; got {keys!r}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"live_plot keys must be unique; got {keys!r}")
        if not (isinstance(min_interval, (int, float)) and math.isfinite(min_interval) and min_interval >= 0):
            raise ValueError(f"min_interval must be a finite number >= 0 (seconds); got {min_interval!r}")
        self.keys = keys
        self.ax = ax
        self.min_interval = float(min_interval)
        self.steps: list[float] = []
        self.values: dict[str, list[float]] = {k: [] for k in keys}
        self._given_ax = ax
        self._figure = None  # a figure this object created (and closes)
        self._state = "new"  # -> "open" -> "closed"
        self._last_draw: float | None = None

    def __enter__(self) -> LivePlot:
        if self._state != "new":
            raise RuntimeError("a live_plot can be entered once: create a new one for each run")
        try:
            import matplotlib.pyplot as plt
            from IPython.display import DisplayHandle
        except ImportError as error:
            raise ImportError("live_plot needs matplotlib and IPython: pip install matplotlib ipython") from error
        self._state = "closed"  # until set up completely
        if self._given_ax is None:
            with plt.ioff():  # drawn through the display handle, not by pyplot
                self._figure, self.ax = plt.subplots()
            self.ax.set_xlabel("step")
        try:
            self._lines = {k: self.ax.plot([], [], label=k)[0] for k in self.keys}
            if self._figure is not None:
                self.ax.legend()
            self._display = DisplayHandle()
            self._display.display(self.ax.figure)
        except BaseException:
            self._close_figure()
            raise
        self._state = "open"
        return self

    def __call__(self, events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self._require_open()
        for event in events:
            self._add(event)
            yield event
            self._require_open()

    def _add(self, event: dict[str, Any]) -> None:
        self._require_open()
        step = float(event["step"])
        if not math.isfinite(step):
            raise ValueError(f"live_plot: event step {event['step']!r} is not finite")
        row = {k: float(event.get(k, math.nan)) for k in self.keys}  # all converted before any is kept
        self.steps.append(step)
        for k, v in row.items():
            self.values[k].append(v if math.isfinite(v) else math.nan)
        now = time.monotonic()
        if self._last_draw is None or now - self._last_draw >= self.min_interval:
            self.refresh()

    def refresh(self) -> None:
        """Redraw now (the interval restarts)."""
        self._require_open()
        for k, line in self._lines.items():
            line.set_data(self.steps, self.values[k])
        self.ax.relim()
        self.ax.autoscale_view()
        self._display.update(self.ax.figure)
        self._last_draw = time.monotonic()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.refresh()
        except Exception as error:
            if exc is None:
                raise
            exc.add_note(f"live_plot: the final redraw failed too: {error!r}")
        finally:
            self._state = "closed"
            self._close_figure()

    def _close_figure(self) -> None:
        if self._figure is not None:
            import matplotlib.pyplot as plt

            plt.close(self._figure)

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError("use the live plot inside its `with live_plot(...) as plot:` block")


def live_plot(*keys: str, ax: Any = None, min_interval: float = 1.0) -> LivePlot:
    """Plot `keys` against each event's `step`, live, in a notebook (needs matplotlib and
    IPython).

        with live_plot("train_loss", "val_loss") as plot:
            for event in pipe(events, plot, take(100)):
                ...

    The first event draws at once, later redraws are at least `min_interval` seconds
    apart (0: every event), and leaving the block draws the rest. Missing or non-finite
    values leave gaps. With `ax`, curves are added to your axes (labels and legend are
    yours); otherwise a figure is created and closed on exit (`plot.ax` stays usable).
    """
    return LivePlot(keys, ax=ax, min_interval=min_interval)


# =========================================================================== helpers


def _as_int(name: str, value: Any) -> int:
    """`value` as an int: Python and numpy integers (anything with `__index__`), not bools."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}") from None


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or operator.index(value) < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return operator.index(value)


def _sample_count(tensors: Sequence[torch.Tensor], name: str) -> int:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor; got {type(t).__name__}")
    counts = [t.shape[0] if t.ndim else None for t in tensors]
    if None in counts or len(set(counts)) != 1:
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"{name} must share their first (sample) dimension; got shapes {shapes}")
    return counts[0]


if __name__ == "__main__":  # pragma: no cover - `python -m mini_trainer.stream` runs the doc examples
    import doctest

    sys.exit(doctest.testmod().failed)
