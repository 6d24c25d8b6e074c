"""The hook interface. A hook overrides any of the `on_*` methods; the trainer calls only
the methods a hook actually overrides, so an idle hook costs nothing per step.

Hooks never depend on their position in the user's list: for each event the trainer runs
them sorted by the class attribute `priority` (lower first, stable for equal values). A
priority can differ per event (`{"on_after_step": 90, "default": 0}`): the checkpointing
hook restores a checkpoint before any other hook starts (so progress and ETA see the
resumed step) but saves after every other hook has finished the step (so the EMA weights
it stores are this step's).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..utils import check_choice

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

HOOK_EVENTS = (
    "on_before_train",
    "on_after_train",
    "on_before_step",
    "on_after_step",
    "on_log",
    "on_log_images",
    "on_state_dict",
    "on_load_state_dict",
    "on_exception",
)


class BaseHook:
    """Base class for trainer hooks; every method is a no-op.

    - `on_before_train(trainer)` / `on_after_train(trainer)`: once around `train()`. Those
      with a negative priority for `on_before_train` run before `fit()`'s relative limits
      are set: that is where a hook restores a checkpoint.
    - `on_before_step(trainer)` / `on_after_step(trainer)`: around each optimizer step;
      `trainer.step_info` holds the step's loss, records, grad_norm, lr, timings, retries.
    - `on_log(trainer, records, dry_run)` / `on_log_images(trainer, images, dry_run)`: fan-out
      of `trainer.log()` / `trainer.log_images()`; `dry_run` is True on ranks that should
      not write anything.
    - `on_state_dict(trainer, state_dict)` / `on_load_state_dict(trainer, state_dict)`: put
      this hook's state into `state_dict["hooks"][<a key of your own>]` and read it back.
    - `on_exception(trainer, error)`: training is ending with `error` (raised again right
      after), also one raised by another hook's `on_before_train`: flush and close what the
      hook holds. `on_after_train` does not run then.

    `on_after_train` and `on_exception` run for every hook even when one of them raises
    (a full disk in one hook must not keep the others from closing files, restoring signal
    handlers or awaiting a save in flight); the first error is raised afterwards, the
    others are logged.
    """

    #: Run order among hooks (lower first): an int, or `{event: int, "default": int}` for
    #: a per-event order. Users never need to order their hook list.
    priority: int | Mapping[str, int] = 0

    def on_before_train(self, trainer: BaseTrainer) -> None:
        pass

    def on_after_train(self, trainer: BaseTrainer) -> None:
        pass

    def on_before_step(self, trainer: BaseTrainer) -> None:
        pass

    def on_after_step(self, trainer: BaseTrainer) -> None:
        pass

    def on_log(self, trainer: BaseTrainer, records: Mapping[str, Any], dry_run: bool = False) -> None:
        pass

    def on_log_images(self, trainer: BaseTrainer, records: Mapping[str, Any], dry_run: bool = False) -> None:
        pass

    def on_state_dict(self, trainer: BaseTrainer, state_dict: dict[str, Any]) -> None:
        pass

    def on_load_state_dict(self, trainer: BaseTrainer, state_dict: Mapping[str, Any]) -> None:
        pass

    def on_exception(self, trainer: BaseTrainer, error: BaseException) -> None:
        pass


def overridden_events(hook: BaseHook) -> list[str]:
    """The `on_*` methods `hook` implements itself (the ones worth calling)."""
    cls = type(hook)
    return [name for name in HOOK_EVENTS if getattr(cls, name) is not getattr(BaseHook, name)]


def hook_priority(hook: BaseHook, event: str = "default") -> int:
    """`hook`'s place in the run order of `event` (lower runs first)."""
    priority = hook.priority
    if isinstance(priority, Mapping):
        return priority.get(event, priority.get("default", 0))
    return priority


class HookDispatcher:
    """Calls hooks for the trainer: per event, only the hooks that implement it, in that
    event's priority order (a stable sort: equal priorities keep the user's order). An idle
    hook costs nothing per step.

    `hooks` is the list in run order (by default priority); `call(event, trainer, *args)`
    calls an event; `added(event, fn)` adds a function for the duration of a block (how
    `fit()` collects its metrics without being a hook).
    """

    def __init__(self, hooks: Sequence[BaseHook] = ()) -> None:
        for i, hook in enumerate(hooks):
            if not isinstance(hook, BaseHook):
                raise TypeError(f"hooks[{i}] must be a BaseHook instance; got {type(hook).__name__}")
        self.hooks: list[BaseHook] = sorted(hooks, key=hook_priority)
        self._methods = {
            event: [
                getattr(hook, event)
                for hook in sorted(hooks, key=lambda h: hook_priority(h, event))
                if event in overridden_events(hook)
            ]
            for event in HOOK_EVENTS
        }
        # on_before_train methods with a negative priority restore state (a checkpoint).
        self._restoring = sum(
            1 for h in hooks if "on_before_train" in overridden_events(h) and hook_priority(h, "on_before_train") < 0
        )

    def call(self, event: str, trainer: BaseTrainer, *args: Any) -> None:
        for method in self._methods[event]:
            method(trainer, *args)

    def before_train(self, trainer: BaseTrainer, after_restoring: Callable[[], None]) -> None:
        """`on_before_train`: the hooks that restore state first, then `after_restoring()`
        (fit()'s relative limits count from the restored step), then every other hook (so
        progress, ETA and logging start from the restored step too)."""
        methods = self._methods["on_before_train"]
        for method in methods[: self._restoring]:
            method(trainer)
        after_restoring()
        for method in methods[self._restoring :]:
            method(trainer)

    def call_each(
        self, event: str, trainer: BaseTrainer, *args: Any, logger: logging.Logger, return_first: bool = True
    ) -> BaseException | None:
        """Call `event` on every hook even when one raises (see `call_each`)."""
        return call_each(self._methods[event], trainer, *args, logger=logger, return_first=return_first)

    def after_train(self, trainer: BaseTrainer, logger: logging.Logger) -> None:
        """`on_after_train` on every hook, also after one failed; the first failure is raised."""
        error = self.call_each("on_after_train", trainer, logger=logger)
        if error is not None:
            raise error

    @contextlib.contextmanager
    def running(self, trainer: BaseTrainer, logger: logging.Logger) -> Iterator[None]:
        """Around a run: `on_after_train` when the block ends normally or by GeneratorExit (an
        events() stream closed between two steps: an ordinary end, so the final checkpoint
        and logs are written); `on_exception` on every hook when it raises, each hook
        flushing and releasing what it holds (metrics, progress bar, files, signal handlers,
        the directory lock) even if another fails; the error is raised again."""
        try:
            yield
        except GeneratorExit:
            self.after_train(trainer, logger)
            raise
        except BaseException as error:
            self.call_each("on_exception", trainer, error, logger=logger, return_first=False)
            if not isinstance(error, SystemExit):  # a preemption's exit is agreed by all ranks; errors are not
                from .. import distributed

                distributed.note_failed_run()
            raise
        else:
            self.after_train(trainer, logger)

    @contextlib.contextmanager
    def added(self, event: str, function: Callable[..., Any]) -> Iterator[None]:
        """Call `function(trainer, *args)` on `event`, after the hooks, inside the block."""
        check_choice("event", event, HOOK_EVENTS)
        methods = self._methods[event]
        methods.append(function)
        try:
            yield
        finally:
            methods.remove(function)


def call_each(
    methods: Sequence[Callable[..., Any]],
    trainer: BaseTrainer,
    *args: Any,
    logger: logging.Logger,
    return_first: bool = True,
) -> BaseException | None:
    """Call every method, also after one raised. Returns the first error (the caller
    raises it) and logs the others with their tracebacks; `return_first=False` logs them
    all (the run already has an error of its own to raise)."""
    first: BaseException | None = None
    for method in methods:
        try:
            method(trainer, *args)
        except BaseException as error:  # SystemExit and KeyboardInterrupt too: the rest must still run
            if first is None and return_first:
                first = error
            else:
                logger.error("%s also failed while the run was ending: %r", _qualname(method), error, exc_info=error)
    return first


def _qualname(method: Callable[..., Any]) -> str:
    owner = getattr(method, "__self__", None)
    return (
        f"{type(owner).__name__}.{method.__name__}"
        if owner is not None
        else getattr(method, "__qualname__", repr(method))
    )
