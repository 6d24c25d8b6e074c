"""BaseTrainer: the step loop, told top to bottom.

A user either subclasses and implements `build_data_loader`, `build_model`,
`build_optimizer` and `forward`, or passes ready objects (`model=`, `optimizer=`,
`data_loader=`, `forward_fn=`). One optimizer step (`run_step`) is:

    accumulate_gradients:                               # N = gradient_accumulation_steps
        for each of the N micro-steps:
            batch = next_batch()                        # epochs roll over, set_epoch() is called
            with gradient sync only on the last micro-step, under autocast():
                loss, records = forward(batch)
            backward(loss)                              # (loss / N).backward(), scaled for fp16
    optimizer_step:                                     # unscale, then
        grad_norm = clip_and_measure_gradients()        # clip + norm, ONE finite check:
                                                        # non-finite -> redo the step, fresh batches
        gradients_ready(skipped)                        # strategies read the final gradients here
        step, zero_grad(set_to_none), scheduler

Losses and records stay on the device; hooks reduce them when they report. The only host
read in the loop is one scalar per step: the fused gradient norm for the non-finite check
(switch it off with `max_non_finite_grad_retries=None`), or with fp16 the GradScaler's
overflow flag. The mechanics live in components: `data_cursor` (where the run is in the
data), `precision` (device, autocast, GradScaler), `state` (model/optimizer state),
`rng`, `metrics`, `hooks.base.HookDispatcher`; docs/strategies.md lists the surface a
strategy or hook may use.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .arguments import check_trainer_arguments
from .data_cursor import END_OF_DATA, DataCursor
from .hooks.base import BaseHook, HookDispatcher
from .metrics import StepMetrics, average_records, check_forward_output, mean_loss
from .precision import autocast_factory, choose_grad_scaler, resolve_device, resolve_precision, scaler_found_inf
from .rng import rng_state, seed_everything, set_rng_state
from .state import (
    check_training_state,
    get_model_and_optimizer_state,
    optimizer_state_by_index,
    optimizer_state_by_name,
    restore_training_state,
    set_model_and_optimizer_state,
    state_dict_options,
    training_state,
)
from .stream import Event, TrainerEvents
from .utils import check_int, unwrap

__all__ = ["END_OF_DATA", "BaseTrainer", "NonFiniteGradientError"]
# Kept importable from here, where they lived before their own modules.
_MOVED = (resolve_device, seed_everything, rng_state, set_rng_state, optimizer_state_by_index, optimizer_state_by_name)

ForwardOutput = tuple["torch.Tensor | None", Mapping[str, Any]]


class NonFiniteGradientError(RuntimeError):
    """Gradients stayed NaN/inf after `max_non_finite_grad_retries` fresh attempts."""


def _cursor_field(name: str, doc: str) -> property:
    """A trainer attribute that lives in its `data_cursor` (readable and settable)."""
    return property(lambda self: getattr(self.data_cursor, name),
                    lambda self, value: setattr(self.data_cursor, name, value), doc=doc)


class BaseTrainer:
    """The training loop. Subclass it, or pass ready objects (docs/trainer.md has the details).

    Args:
        max_steps / max_epochs: optimizer steps / passes over the data to train for (the
            first reached ends the run; None: no such limit).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        max_non_finite_grad_retries: redo a step whose gradients are NaN/inf with fresh
            batches up to this many times in a row, then raise `NonFiniteGradientError`
            (0: at once; None: no check, no host read per step; fp16: the scaler skips).
        mixed_precision: "fp16", "bf16", "auto" or None (see `mini_trainer.precision`).
        gradient_accumulation_steps: micro-batches per step; the loss is scaled by 1/N.
        workspace: directory for metrics.jsonl, checkpoints and other run files.
        device: "auto" (cuda > mps > cpu), a device string, a `torch.device` or a CUDA index.
        parallelism: under torchrun, "auto" (DDP with more than one process), "ddp", "fsdp"
            (FSDP2 on each of `fsdp_units` and the root; the trainer builds the optimizer)
            or None (you manage the model); `parallel_kwargs` go to the wrapper.
        fsdp_units: module classes, a predicate, or None (items of the outer ModuleList).
        no_sync_accumulate: skip the gradient all-reduce on non-final micro-steps.
        state_dict_options: `StateDictOptions` for the model/optimizer state (default: plain
            state dicts; FSDP2: full state gathered on CPU, loadable on any process count).
        logger: a `logging.Logger` (default: the "mini_trainer" logger).
        seed: seeds python, numpy and torch before anything is built (None: don't).
        compile: wrap the model in `torch.compile` (True, or a dict of its keywords).
        model, optimizer, data_loader, lr_scheduler, grad_scaler, hooks: ready objects that
            the default `build_*` methods return.
        forward_fn: `forward_fn(model, batch) -> loss | (loss, records)` for the default `forward`.

    Attributes: `step` (optimizer steps done), `epoch`, `batch_in_epoch`, `model`,
    `optimizer`, `lr_scheduler`, `grad_scaler`, `data_loader`, `hooks`, `device`,
    `step_info` (this step's loss, records, grad_norm, lr, data_time, step_time, retries:
    the blackboard hooks read), `should_stop` (set it to end training after this step).
    """

    #: The most processes this trainer runs on (None: any number). A strategy whose update
    #: is not synchronised across ranks sets it to 1, with the reason in `max_processes_reason`;
    #: `build()` then refuses a larger torchrun launch before anything is built.
    max_processes: int | None = None
    max_processes_reason: str = ""

    def __init__(
        self,
        *,
        max_steps: int | None = None,
        max_epochs: int | None = None,
        grad_clip: float | None = None,
        max_non_finite_grad_retries: int | None = 0,
        mixed_precision: str | None = None,
        gradient_accumulation_steps: int = 1,
        workspace: str | Path | None = None,
        device: str | torch.device | int = "auto",
        parallelism: str | None = "auto",
        fsdp_units: tuple[type, ...] | Callable[[nn.Module], bool] | None = None,
        parallel_kwargs: Mapping[str, Any] | None = None,
        no_sync_accumulate: bool = True,
        state_dict_options: Any = None,
        logger: logging.Logger | None = None,
        seed: int | None = None,
        compile: bool | Mapping[str, Any] = False,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        data_loader: Iterable | None = None,
        lr_scheduler: Any = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        hooks: Sequence[BaseHook] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        check_trainer_arguments(locals())
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_precision(mixed_precision, self.device)
        self.mixed_precision = mixed_precision
        self.max_steps, self.max_epochs = max_steps, max_epochs
        self.grad_clip = grad_clip
        self.max_non_finite_grad_retries = max_non_finite_grad_retries
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.workspace = Path(workspace) if workspace is not None else None
        self.parallelism, self.fsdp_units = parallelism, fsdp_units
        self.parallel_kwargs = dict(parallel_kwargs or {})
        self.parallel: str | None = None  # what the model was wrapped in here: None, "ddp" or "fsdp"
        self.no_sync_accumulate = bool(no_sync_accumulate)
        self.state_dict_options = state_dict_options
        self.logger = logger or logging.getLogger("mini_trainer")
        self.seed, self.compile, self.forward_fn = seed, compile, forward_fn
        self._given = {"model": model, "optimizer": optimizer, "data_loader": data_loader,
                       "lr_scheduler": lr_scheduler, "grad_scaler": grad_scaler,
                       "hooks": list(hooks) if hooks is not None else None}

        self.step = 0
        self.micro_step = 0  # index of the micro-batch being processed within the step
        self.step_info: dict[str, Any] = {}
        self.should_stop = False
        self.data_cursor = DataCursor(None, self.device, self.logger)  # epoch, batch_in_epoch, iterator
        self.model: nn.Module = None  # type: ignore[assignment]
        self.optimizer: torch.optim.Optimizer = None  # type: ignore[assignment]
        self.lr_scheduler: Any = None
        self.grad_scaler: torch.amp.GradScaler | None = None
        self.active_scaler: torch.amp.GradScaler | None = None  # the enabled scaler: scales losses
        self._dispatch: HookDispatcher | None = None  # the hooks, once built
        self._built = False
        self._running = False  # a run is in progress (or suspended: an unfinished events() stream)
        self._param_key: tuple[int, int] | None = None
        self._params: list[torch.Tensor] = []
        self._world = 1
        self._grads_agree = True  # every rank sees the same gradients (one process, or a wrapper syncs them)

    # ======================================================================= build

    def build_data_loader(self) -> Iterable:
        """Any iterable of batches; a finite one is restarted every epoch."""
        return self.given("data_loader", required=True)

    def build_model(self) -> nn.Module:
        """The model (moved to `self.device` by the trainer afterwards)."""
        return self.given("model", required=True)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over `self.model`'s parameters (the model is built first)."""
        return self.given("optimizer", required=True)

    def build_lr_scheduler(self) -> Any:
        """An LR scheduler stepped once per optimizer step, or None."""
        return self.given("lr_scheduler")

    def build_grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler; by default one for fp16 (also on CPU; sharded under FSDP2), else None."""
        return self.given("grad_scaler") or choose_grad_scaler(self.device, self.autocast_dtype, self.parallel)

    def build_hooks(self) -> list[BaseHook]:
        """Hooks for this run (their order does not matter)."""
        return list(self.given("hooks") or [])

    def given(self, name: str, *, required: bool = False) -> Any:
        """The ready object passed to the constructor as `name` (None when none was); with
        `required=True`, a missing one is a NotImplementedError saying how to provide it."""
        value = self._given[name]
        if value is None and required:
            raise NotImplementedError(
                f"{type(self).__name__} has no {name}: pass {name}=... to the constructor "
                f"or override build_{name}()"
            )
        return value

    def build(self) -> None:
        """Build everything once (`train()`, `fit()` and the state methods call it; call it
        yourself to inspect the model before training). Order: process group -> seed ->
        model (moved, then wrapped for DDP/FSDP) -> optimizer -> data -> scheduler ->
        scaler -> hooks. Seeding first makes the initial weights and the data order
        reproducible (the same seed on every rank: FSDP2 shards a model that must start
        identical everywhere); the optimizer comes after wrapping because FSDP2 replaces
        the parameters with sharded ones; a scheduler may size itself from the data
        (`estimated_total_steps()`). Hooks are fixed from here on."""
        if self._built:
            return
        world = distributed.launched_world()  # known under torchrun before the group exists
        if self.max_processes is not None and world > self.max_processes:
            limit = "one process" if self.max_processes == 1 else f"at most {self.max_processes} processes"
            raise NotImplementedError(
                f"{type(self).__name__} runs on {limit}, and this run has {world}: "
                f"{self.max_processes_reason or 'it does not support more'}"
            )
        if self.parallelism is not None:
            distributed.init_from_env(self.device)
        self._world = distributed.get_world_size()
        if self.seed is not None:
            seed_everything(self.seed)
        if self.workspace is not None and distributed.is_main_process():
            try:
                self.workspace.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                message = f"workspace {str(self.workspace)!r} cannot be created: {err.strerror or err}"
                raise OSError(err.errno, message) from None

        model = _built("build_model()", self.build_model(), nn.Module, "an nn.Module")
        self.parallel = distributed.resolve_parallelism(self.parallelism, model)
        if self.parallel == "fsdp" and self._given["optimizer"] is not None:
            raise TypeError(
                "parallelism='fsdp' replaces the model's parameters with sharded ones, so a ready "
                "optimizer= would update the old ones: override build_optimizer() (or use "
                "optimizer_cfg in a config) so that the trainer builds it after sharding"
            )
        model = model.to(self.device)
        if self.parallel is not None:
            model = distributed.wrap_model(model, self.parallel, self.device, fsdp_units=self.fsdp_units,
                                           parallel_kwargs=self.parallel_kwargs)
        self.model = model
        self._grads_agree = self._world == 1 or distributed.is_wrapped(self.model)
        self.optimizer = _built("build_optimizer()", self.build_optimizer(), torch.optim.Optimizer,
                                "a torch.optim.Optimizer")
        self.data_cursor.loader = _built("build_data_loader()", self.build_data_loader(), Iterable,
                                         "an iterable of batches")
        self.lr_scheduler = self.build_lr_scheduler()
        if self.lr_scheduler is not None and not callable(getattr(self.lr_scheduler, "step", None)):
            raise TypeError(f"build_lr_scheduler() must return an object with step(); got {self.lr_scheduler!r}")
        self.grad_scaler = self.build_grad_scaler()
        self._build_hooks()
        if self.compile:
            self.model = torch.compile(self.model, **(dict(self.compile) if isinstance(self.compile, Mapping) else {}))
        self._autocast_factory = autocast_factory(self.device, self.autocast_dtype)
        self.active_scaler = self.grad_scaler if self.grad_scaler is not None and self.grad_scaler.is_enabled() else None
        self._built = True

    def _build_hooks(self) -> HookDispatcher:
        """The hooks, built once (logging before training needs them, not the model)."""
        if self._dispatch is None:
            self._dispatch = HookDispatcher(self.build_hooks())
        return self._dispatch

    # ======================================================================= the run

    def train(self) -> None:
        """Train until `max_steps` optimizer steps or `max_epochs` epochs (whichever first),
        or until a hook sets `should_stop`."""
        for _ in self._run(require_limit=True):
            pass

    def fit(self, data_loader: Iterable | None = None, *, epochs: int | None = None, steps: int | None = None) -> dict[str, Any]:
        """Train for `epochs` more epochs and/or `steps` more steps (whichever ends first)
        and return the metrics averaged over those steps (`loss`, records, `grad_norm`, ...)
        plus `step` and `epoch`.

        `epochs=E` runs until the E-th epoch end from here (started mid-epoch, the rest of
        the current epoch counts as one). Without `epochs` and `steps` the constructor's
        `max_steps`/`max_epochs` apply; they are left as they were afterwards. A
        `data_loader` given here replaces the current one and starts a new epoch.
        """
        check_int("epochs", epochs, minimum=1, allow_none=True)
        check_int("steps", steps, minimum=1, allow_none=True)
        if data_loader is not None and not isinstance(data_loader, Iterable):
            raise TypeError(f"data_loader must be an iterable of batches; got {type(data_loader).__name__}")
        self._check_not_running()
        if data_loader is not None:
            self._given["data_loader"] = data_loader  # what the default build_data_loader returns
        self.build()
        if data_loader is not None and data_loader is not self.data_loader:
            self.data_cursor.replace_loader(data_loader)  # a subclass's build_data_loader did not return it
        metrics = StepMetrics()  # averages over this call, read once at the end
        with self._build_hooks().added("on_after_step", lambda trainer: metrics.add(trainer.step_info)):
            for _ in self._run(epochs, steps, require_limit=True):
                pass
        return {**metrics.compute(), "step": self.step, "epoch": self.epoch}

    def events(self, *, epochs: int | None = None, steps: int | None = None) -> TrainerEvents:
        """Train lazily: one event (a dict: `step`, `epoch`, `step_info`'s entries, `model`,
        `trainer`) per optimizer step, for the `mini_trainer.stream` stages. Hooks run as in
        `train()`; the run ends at `epochs`/`steps` more (relative, as in `fit()`), at the
        constructor's limits, or when the stream is closed (`take`, `early_stop`, `close()`,
        leaving `with trainer.events() as events:`); until then the trainer refuses another
        run. Details and the rules under torchrun: docs/stream.md."""
        check_int("epochs", epochs, minimum=1, allow_none=True)
        check_int("steps", steps, minimum=1, allow_none=True)
        self._check_not_running()
        return TrainerEvents(self._events(self._run(epochs, steps, require_limit=False)))

    def _events(self, run: Iterator[None]) -> Iterator[dict[str, Any]]:
        model = None
        try:
            for _ in run:
                if model is None:  # built by now
                    model = self.unwrapped_model
                try:
                    yield Event(self.step_info, step=self.step, epoch=self.epoch, model=model, trainer=self)
                except GeneratorExit:
                    raise
                except BaseException as error:  # raised in the consumer: the run ends with it
                    run.throw(error)
        finally:
            run.close()  # a stopped consumer: on_after_train runs now, not at garbage collection

    def _run(self, epochs: int | None = None, steps: int | None = None, *, require_limit: bool) -> Iterator[None]:
        """The one run that `train()`, `fit()` and `events()` drain, pausing after each step.
        Closed at a pause, it ends like a run that reached its limit. `epochs`/`steps` are
        relative limits, counted once a checkpoint is restored; the constructor's limits
        are put back afterwards."""
        self.build()
        if require_limit and epochs is None and steps is None:
            self.check_limits()
        self._check_not_running()
        self._running = True  # until this generator ends: a second run now would corrupt this one
        limits = self.max_steps, self.max_epochs
        hooks = self._build_hooks()
        self.should_stop = False
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            hooks.before_train(self, after_restoring=lambda: self._set_relative_limits(epochs, steps))
            while not self._finished():
                done = self.step
                self.run_step()
                if self.step > done:  # not when the data ran out before a step could be taken
                    yield
        except GeneratorExit:
            # The consumer of events() stopped asking (take, early_stop, a break) between two
            # steps: an ordinary end, so the final checkpoint and logs are written.
            self._end_run()
            raise
        except BaseException as error:
            # Every hook flushes and releases what it holds (metrics, progress bar, files,
            # signal handlers, the directory lock), even if one of them fails; the error wins.
            hooks.call_each("on_exception", self, error, logger=self.logger, return_first=False)
            if not isinstance(error, SystemExit):  # a preemption's exit is agreed by all ranks; errors are not
                distributed.note_failed_run()
            raise
        else:
            self._end_run()
        finally:
            self._running = False
            if epochs is not None or steps is not None:
                self.max_steps, self.max_epochs = limits

    def _end_run(self) -> None:
        """Every hook's on_after_train, also after one failed; the first failure is raised."""
        error = self._build_hooks().call_each("on_after_train", self, logger=self.logger)
        if error is not None:
            raise error

    def _check_not_running(self) -> None:
        if self._running:
            raise RuntimeError(
                "this trainer is still in a run: a stream from trainer.events() was left unfinished "
                "(a break, an error outside a stage, or a variable still holding it). Close it first "
                "(events.close()), or use `with trainer.events() as events:` so that it closes itself"
            )

    def _set_relative_limits(self, epochs: int | None, steps: int | None) -> None:
        if epochs is None and steps is None:
            return
        self.data_cursor.roll_over_if_epoch_done()
        self.max_epochs = self.epoch + epochs if epochs is not None else None
        self.max_steps = self.step + steps if steps is not None else None

    def check_limits(self) -> None:
        """Raise unless training has an end (`max_steps` or `max_epochs`)."""
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("train() needs a limit: set max_steps or max_epochs (or call fit(steps=..., epochs=...))")

    def _finished(self) -> bool:
        if self.should_stop or (self.max_steps is not None and self.step >= self.max_steps):
            return True
        if self.max_epochs is None:
            return False
        self.data_cursor.roll_over_if_epoch_done()
        return self.epoch >= self.max_epochs

    def estimated_total_steps(self) -> int | None:
        """`max_steps`, or the steps `max_epochs` amount to when the loader has a length."""
        estimate = None
        if self.max_epochs is not None:
            left = self.data_cursor.steps_left(self.max_epochs, self.gradient_accumulation_steps)
            estimate = None if left is None else self.step + left
        if self.max_steps is not None:
            return self.max_steps if estimate is None else min(estimate, self.max_steps)
        return estimate

    # ======================================================================= the step

    def run_step(self) -> None:
        """One optimizer step, redone with fresh batches while gradients are non-finite."""
        info = self.step_info = {"retries": 0, "data_time": 0.0}  # fresh: hooks may keep the last one
        hooks = self._build_hooks()
        hooks.call("on_before_step", self)
        started = time.perf_counter()
        while True:
            if not self.accumulate_gradients(info):
                # The epoch limit came before any micro-batch (loaders without a length, or a
                # retry that needed more data).
                if info["retries"]:
                    self.logger.warning("step %d: no data left to retry non-finite gradients; stopping", self.step + 1)
                self.should_stop = True
                return
            if self.optimizer_step():
                break
            info["retries"] += 1
            if info["retries"] > self.max_non_finite_grad_retries:
                raise NonFiniteGradientError(
                    f"non-finite gradients at step {self.step + 1} (epoch {self.epoch}): "
                    f"{info['retries']} attempt(s) in a row, max_non_finite_grad_retries="
                    f"{self.max_non_finite_grad_retries}; check the learning rate, the data "
                    "and the loss, or raise the limit"
                )
            self.logger.warning("non-finite gradients at step %d; retrying with fresh batches", self.step + 1)
        self.step += 1
        info["step_time"] = time.perf_counter() - started
        hooks.call("on_after_step", self)
        if self._world > 1:
            # A hook may ask one rank to stop (early stopping on its metric, a time limit):
            # a rank that stopped alone would leave the others waiting in the next all-reduce.
            self.should_stop = bool(distributed.agree_max(int(self.should_stop)))

    def accumulate_gradients(self, info: dict[str, Any]) -> bool:
        """Run the micro-steps of one optimizer step (next_batch -> forward under autocast ->
        backward) and put `loss`, `records`, `micro_steps` into `info`; False when no batch
        was left."""
        n = self.gradient_accumulation_steps
        losses: list[torch.Tensor] = []
        all_records: list[Mapping[str, Any]] = []
        synced = n == 1 or not self.no_sync_accumulate
        for micro_step in range(n):
            self.micro_step = micro_step
            fetch_start = time.perf_counter()
            batch = self.next_batch()
            info["data_time"] += time.perf_counter() - fetch_start
            if batch is END_OF_DATA:
                break
            # All-reducing gradients is only useful once they are complete: on the last
            # micro-step, or on the last batch of training when the data ends mid-step.
            sync = micro_step == n - 1 or not self.no_sync_accumulate or self.data_cursor.is_last_batch(self.max_epochs)
            with distributed.gradient_sync(self.model, sync) if n > 1 else _NULL:
                with self.autocast():
                    loss, records = check_forward_output(self.forward(batch), type(self).__name__)
                if loss is not None:
                    self.backward(loss)
                    losses.append(loss.detach())
                    synced = synced or sync
            all_records.append(records)
        if not all_records:
            return False
        if losses and not synced:
            # The micro-step that would have all-reduced produced no loss (or the data ended
            # first): sync by hand. Ranks agree: under DDP they run the same backward passes.
            distributed.all_reduce_gradients(self.model, self.optimized_params)
        if losses and len(losses) < n:
            # Skipped micro-steps (None loss, end of data): average over the ones that ran.
            grads = [p.grad for p in self.optimized_params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, n / len(losses))
        info["loss"] = mean_loss(losses)
        info["records"] = average_records(all_records)
        info["micro_steps"] = len(losses)
        return True

    def next_batch(self) -> Any:
        """The next batch, on `self.device` (finite loaders roll over into the next epoch),
        or `END_OF_DATA` when `max_epochs` ends before the step does."""
        return self.data_cursor.next_batch(self.max_epochs)

    def forward(self, batch: Any) -> ForwardOutput:
        """Compute `(loss, records)` for one micro-batch (already on `self.device`).

        `loss` is a scalar tensor, or None to skip this micro-step's backward; `records` is
        a (nested) dict of Python numbers or 0-d tensors, averaged by the hooks at log time.
        Keep tensors as tensors: calling `.item()` here syncs the host every step.
        """
        if self.forward_fn is None:
            raise NotImplementedError(
                f"{type(self).__name__}.forward is not implemented: override forward(batch) "
                "or pass forward_fn=lambda model, batch: loss"
            )
        out = self.forward_fn(self.model, batch)
        return (out, {}) if isinstance(out, torch.Tensor) else out

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-step's loss: scaled by 1/N, and by the fp16 loss scale."""
        if self.gradient_accumulation_steps > 1:
            loss = loss / self.gradient_accumulation_steps
        if self.active_scaler is not None:
            loss = self.active_scaler.scale(loss)
        loss.backward()

    def optimizer_step(self) -> bool:
        """Unscale, clip, check, step, zero the gradients and step the scheduler. False (and
        the gradients discarded) when they are non-finite and the trainer retries; True when
        the step was taken (an fp16 scaler may still skip the update: not a failure)."""
        scaler = self.active_scaler
        overflowed = False
        if scaler is not None:
            scaler.unscale_(self.optimizer)
            # The one host read of an fp16 step: the scaler's own overflow flag (it reads it
            # again in step()); an overflowing step is skipped, so the schedule waits too.
            overflowed = scaler_found_inf(scaler, self.optimizer)
        grad_norm = self.clip_and_measure_gradients()
        if grad_norm is not None:
            self.step_info["grad_norm"] = grad_norm
        if scaler is None and self.max_non_finite_grad_retries is not None:
            # The one host read of a step: the norm is a single fused reduction over all
            # gradients, and it is NaN/inf exactly when some gradient is.
            finite = math.isfinite(grad_norm)
            if not self._grads_agree:
                # Ranks whose gradients no wrapper synchronised can disagree; all must retry
                # together, or one would wait forever in the others' next all-reduce.
                finite = not distributed.agree_max(int(not finite))
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                return False
        self.gradients_ready(skipped=overflowed)
        self.step_info["lr"] = self.optimizer.param_groups[0]["lr"]
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
            self.step_info["skipped"] = overflowed
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None and not overflowed:
            self.lr_scheduler.step()
        return True

    def gradients_ready(self, skipped: bool) -> None:
        """Called when a step's gradients are final (unscaled, clipped, found finite), just
        before the optimizer uses them; `skipped` when an fp16 overflow makes the scaler skip
        this update. Does nothing here; a strategy may read them (PhaseTrainer does)."""

    def clip_and_measure_gradients(self) -> torch.Tensor | None:
        """Global gradient norm (after unscaling), clipping in place when `grad_clip` is set;
        None when neither clipping nor the finite check needs it."""
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.optimized_params, self.grad_clip, foreach=True)
        elif self.max_non_finite_grad_retries is None or self.active_scaler is not None:
            return None  # nobody needs it: fp16 overflow is the scaler's business
        else:
            grads = [p.grad for p in self.optimized_params if p.grad is not None]
            if not grads:
                return torch.zeros((), device=self.device)
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        # FSDP2 gradients are sharded DTensors: their norm is already the global one, replicated.
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @property
    def optimized_params(self) -> list[torch.Tensor]:
        """The parameters the optimizer updates (re-read when param groups change, e.g.
        after `add_param_group` to unfreeze layers): what is clipped, checked, rescaled."""
        groups = self.optimizer.param_groups
        key = (len(groups), sum(len(group["params"]) for group in groups))
        if key != self._param_key:
            self._param_key = key
            self._params = [p for group in groups for p in group["params"]]
        return self._params

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context `forward` runs in (a no-op without mixed precision); use it
        for any extra forward pass a strategy or evaluation makes."""
        return self._autocast_factory()

    # ======================================================================= logging

    def log(self, records: Mapping[str, Any], dry_run: bool = False) -> None:
        """Send aggregated metrics to every hook's `on_log` (W&B, metrics.jsonl, ...)."""
        self._build_hooks().call("on_log", self, records, dry_run)

    def log_images(self, records: Mapping[str, Any], dry_run: bool = False) -> None:
        """Send `{name: image}` to every hook's `on_log_images`."""
        self._build_hooks().call("on_log_images", self, records, dry_run)

    # ======================================================================= state

    def state_dict(self, *, sharded: bool = False) -> dict[str, Any]:
        """Everything needed to continue this run exactly: model, optimizer, scheduler,
        scaler, counters, data position and loader state, RNG states, each hook's state
        under `"hooks"`. Collective: every rank calls it; rank 0's result holds the full
        model/optimizer state (FSDP2 gathered; `sharded=True`: this rank's DTensor shards)
        and every rank's RNG and loader state under `"ranks"`."""
        self.build()
        model_state, optimizer_state = self.model_and_optimizer_state(sharded)
        state = training_state(step=self.step, cursor=self.data_cursor, world=self._world, model_state=model_state,
                               optimizer_state=optimizer_state, lr_scheduler=self.lr_scheduler,
                               grad_scaler=self.grad_scaler)
        self._build_hooks().call("on_state_dict", self, state)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], *, sharded: bool = False) -> None:
        """Restore what `state_dict()` returned; training continues from its `step`. Each
        rank takes back its own RNG and loader state; onto another number of processes the
        data position moves (see `DataCursor.move`). A state that does not fit (see
        `check_state_dict`) raises before anything is assigned."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict expects a dict from state_dict(); got {type(state_dict).__name__}")
        self.check_state_dict(state_dict, sharded=sharded)
        set_model_and_optimizer_state(self.model, self.optimizer, state_dict["model"], state_dict["optimizer"],
                                      state_dict_options(self.state_dict_options, self.model, sharded))
        self.step = int(state_dict["step"])
        restore_training_state(state_dict, cursor=self.data_cursor, world=self._world,
                               lr_scheduler=self.lr_scheduler, grad_scaler=self.grad_scaler)
        self._build_hooks().call("on_load_state_dict", self, state_dict)

    def check_state_dict(self, state_dict: Mapping[str, Any], *, sharded: bool = False) -> None:
        """Raise `CheckpointError` unless `state_dict` fits this trainer: counters are
        integers >= 0, model tensors have this model's names and shapes, the optimizer state
        this optimizer's groups and shapes (see `mini_trainer.state`). Loading from a run's
        checkpoints uses it to fall back to an older checkpoint that does fit."""
        self.build()
        strict = getattr(self.state_dict_options, "strict", True)
        check_training_state(state_dict, self.unwrapped_model, self.optimizer, sharded=sharded, strict=strict)

    def model_and_optimizer_state(self, sharded: bool = False) -> tuple[dict, dict]:
        """The model's and the optimizer's state dicts, as `state_dict()` holds them (with
        `sharded=True`, this rank's DTensor shards: what DCP saves and loads into)."""
        options = state_dict_options(self.state_dict_options, self.model, sharded)
        return get_model_and_optimizer_state(self.model, self.optimizer, options)

    # ======================================================================= read-only views

    epoch = _cursor_field("epoch", "The current pass over the data.")
    batch_in_epoch = _cursor_field("batch_in_epoch", "Batches drawn from the current epoch.")
    data_loader = _cursor_field("loader", "The loader batches come from (`fit(data_loader)` starts a new pass).")

    @property
    def hooks(self) -> list[BaseHook]:
        """This run's hooks in run order (empty until built)."""
        return self._dispatch.hooks if self._dispatch is not None else []

    @property
    def is_built(self) -> bool:
        """Whether `build()` has run (a subclass's `build()` override checks it first)."""
        return self._built

    def in_workspace(self, path: str | Path) -> Path:
        """`path` as a run file: a relative path is taken inside `workspace` (without a
        workspace: the current directory), an absolute one as it is."""
        path = Path(path)
        return self.workspace / path if self.workspace is not None and not path.is_absolute() else path

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The plain module under torch.compile / DDP / FSDP1 / AveragedModel wrappers."""
        return unwrap(model)

    @property
    def unwrapped_model(self) -> nn.Module:
        """`self.model` without its torch.compile / DDP / FSDP1 wrappers."""
        return unwrap(self.model)


_NULL = contextlib.nullcontext()  # reusable: it holds no state


def _built(method: str, value: Any, kind: type, description: str) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"{method} must return {description}; got {type(value).__name__}")
    return value
