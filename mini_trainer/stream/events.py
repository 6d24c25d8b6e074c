"""What flows through a stream and how its stages stay linked to it.

`Event` is the dict each source yields; `Transform` is the type of a stage; `TrainerEvents`
is what `BaseTrainer.events()` returns. The rest is plumbing for stages written with
`_stage`: each output remembers the stream it reads, so that a stage which ends the stream
(`take`, `early_stop`) can end a training run further up (`_end_run`), and an error raised
in any stage reaches that run's hooks as the run's error (`_abort_run`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, overload

from torch import nn

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


class TrainerEvents:
    """What `BaseTrainer.events()` returns: an iterator of step events that can be closed
    (ending the run like a reached limit) and used as a context manager."""

    def __init__(self, events: Iterator[dict[str, Any]]) -> None:
        self._events = events

    @classmethod
    def of_run(cls, run: Iterator[None], trainer: Any) -> TrainerEvents:
        """The events of `run`, a generator that pauses after each of `trainer`'s steps."""
        return cls(_step_events(run, trainer))

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


def _step_events(run: Iterator[None], trainer: Any) -> Iterator[dict[str, Any]]:
    model = None
    try:
        for _ in run:
            if model is None:  # built by now
                model = trainer.unwrapped_model
            try:
                yield Event(trainer.step_info, step=trainer.step, epoch=trainer.epoch, model=model, trainer=trainer)
            except GeneratorExit:
                raise
            except BaseException as error:  # raised in the consumer: the run ends with it
                run.throw(error)
    finally:
        run.close()  # a stopped consumer: on_after_train runs now, not at garbage collection


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
