"""Signals that mean "finish this step, save, exit": what `CheckpointingHook(exit_signals=...)`
catches. The handler only records the signal; the hook acts on it between two steps, when
the state is consistent. A second signal of the same kind gets the previous behaviour
(Ctrl-C twice stops at once)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from .. import distributed

logger = logging.getLogger("mini_trainer")


def check_exit_signals(exit_signals: Any) -> list[signal.Signals]:
    """`exit_signals` as a list of signals, or an error naming the argument."""
    if isinstance(exit_signals, (int, str)) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in exit_signals
    ):
        raise TypeError(
            "CheckpointingHook.exit_signals must be a list of signal numbers (e.g. [signal.SIGTERM]); "
            f"got {exit_signals!r}"
        )
    valid = set(signal.valid_signals())
    for signum in exit_signals:
        if signum not in valid or signum in (signal.SIGKILL, getattr(signal, "SIGSTOP", -1)):
            raise ValueError(f"CheckpointingHook.exit_signals: {signum!r} is not a signal that can be caught")
    return [signal.Signals(s) for s in exit_signals]


class ExitSignals:
    """Records the first of `signals` received while installed."""

    def __init__(self, signals: Sequence[signal.Signals]) -> None:
        self.signals = list(signals)
        self.received: int | None = None
        self._previous_handlers: dict[int, Any] = {}

    def install(self) -> None:
        if self._previous_handlers:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("CheckpointingHook: training runs outside the main thread; exit_signals are not handled")
            return
        for signum in self.signals:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # ignored on purpose by whoever started us (e.g. SIGINT for `cmd &`)
            # A bound method, not a closure made in this loop: each signal is recorded as itself.
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        previous = self._previous_handlers.get(signum)
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def restore(self) -> None:
        """Give every signal its handler from before `install()`."""
        for signum, previous in self._previous_handlers.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def agreed(self) -> int:
        """The signal to act on now (0: none); in a distributed run, any rank's signal stops all."""
        return distributed.agree_max(self.received or 0)
