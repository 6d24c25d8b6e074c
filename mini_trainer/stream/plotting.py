"""`live_plot`: metrics drawn against `step` in a notebook while the stream runs (needs
matplotlib and IPython, imported when the plot is entered)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

from .checks import detail, is_bad


class LivePlot:
    """A stream stage and context manager that draws metrics against `step` in one
    notebook output, updated as events pass (see `live_plot`)."""

    def __init__(self, keys: tuple[str, ...], *, ax: Any = None, min_interval: float = 1.0) -> None:
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"Provide at least one nonempty metric key. Got keys={keys!r}.")
        if len(set(keys)) != len(keys):
            raise ValueError(f"Metric keys must be unique. Got keys={keys!r}.")
        allowed = "a finite number of seconds >= 0"
        if is_bad("min_interval", min_interval, allowed, lambda v: not math.isfinite(v) or v < 0):
            message = "min_interval must be finite and nonnegative."
            raise ValueError(message + detail("min_interval", min_interval, allowed))
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
            raise RuntimeError("Create a new live_plot context for each run. This one was entered already.")
        try:
            import matplotlib.pyplot as plt
            from IPython.display import DisplayHandle
        except ImportError as error:
            raise ImportError(
                "live_plot requires Matplotlib and IPython. Install with: pip install matplotlib ipython"
                " (or the 'mini_trainer[stream]' extra)"
            ) from error
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
            raise ValueError(f"Event 'step' must be finite. Got step={event['step']!r}.")
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
            raise RuntimeError("Use live_plot inside its 'with' context. Write: with live_plot(...) as plot: ...")


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
