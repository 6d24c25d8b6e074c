"""Stages: functions of a stream that return a stream (`Transform`), chained with `pipe`.

They are lazy: each pulls one event at a time from the stage before it, so `take` and
`early_stop` end a training run by not asking for more (and close a `trainer.events()`
run upstream: see `mini_trainer.stream`). `print_keys` is a callback for `tap`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any, Literal

import torch

from .checks import check, detail
from .events import Transform, _end_run, _Stage, _stage


def pipe(stream: Iterable[dict[str, Any]], *stages: Transform) -> Iterable[dict[str, Any]]:
    """Apply `stages` to `stream` left to right: `pipe(s, f, g)` is `g(f(s))`.

    >>> list(pipe([{"x": 1}, {"x": 2}], augment(lambda e: {"y": 10 * e["x"]}), take(1)))
    [{'x': 1, 'y': 10}]
    """
    for index, stage in enumerate(stages):
        if not callable(stage):
            raise TypeError(
                f"pipe stages must be callable. Got stage {index}: {type(stage).__name__} {stage!r};"
                " allowed: a function stream -> stream."
            )
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

    @_stage
    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for event in events:
            if not callable(fn):  # as in fitstream: found when it is called, on the first event
                message = f"{type(fn).__name__!r} object is not callable."
                raise TypeError(message + detail("fn", fn, "a function event -> dict | None"))
            extra = fn(event) or {}  # None (or anything empty) adds nothing
            if not isinstance(extra, dict):
                raise TypeError(f"augment function must return a dict or None. It returned {type(extra).__name__}.")
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
    # As in fitstream: a float n passes here and islice rejects it on the first next().
    check("n", n, "an int >= 0", lambda v: v < 0, "n must be >= 0.")

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
        raise TypeError("tap requires a callable." + detail("fn", fn, "a function event -> any"))
    check("every", every, "an int >= 1", lambda v: v < 1, "every must be >= 1.")
    check("start", start, "an int >= 1", lambda v: v < 1, "start must be >= 1.")

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
        raise TypeError("tick requires a callable." + detail("fn", fn, "a function with no arguments"))

    @_stage
    def stage(events: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for event in events:
            fn()
            yield event

    return stage


def print_keys(
    *keys: str, precision: int = 4, include_step: bool = True, step_key: str = "step"
) -> Callable[[dict[str, Any]], None]:
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
    check("precision", precision, "an int >= 0", lambda v: v < 0, "precision must be >= 0.")
    if not keys and not include_step:
        raise ValueError("Provide at least one key when include_step=False. Got no key to print.")

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
        raise ValueError(f"Provide exactly one of decay or half_life. Got decay={decay!r}, half_life={half_life!r}.")
    if half_life is not None:
        check("half_life", half_life, "a number > 0", lambda v: v <= 0.0, "half_life must be > 0.")
        decay = 2.0 ** (-1.0 / half_life)  # NaN and inf half-lives fail as a decay, as in fitstream
    name_given = "decay" if half_life is None else "decay (from half_life)"
    check(name_given, decay, "a number in (0, 1)", lambda v: not (0.0 < v < 1.0), "decay must be in (0, 1).")
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

    Stopping ends a `trainer.events()` run upstream (see `mini_trainer.stream`).

    >>> values = [5, 4, 4.5, 4.2, 3, 3.5]
    >>> [e["val"] for e in early_stop("val", patience=2)({"val": v} for v in values)]
    [5, 4, 4.5, 4.2]
    """
    check("patience", patience, "an int >= 1", lambda v: v < 1, "patience must be >= 1.")
    if mode not in ("min", "max"):
        raise ValueError("mode must be one of {'min', 'max'}." + detail("mode", mode, "'min' or 'max'"))
    check("min_delta", min_delta, "a number >= 0", lambda v: v < 0.0, "min_delta must be >= 0.")
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
