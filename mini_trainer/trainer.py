"""BaseTrainer: the step loop, told top to bottom.

A user either subclasses and implements `build_data_loader`, `build_model`,
`build_optimizer` and `forward`, or passes ready objects (`model=`, `optimizer=`,
`data_loader=`, `forward_fn=`). One optimizer step is:

    for each of the N = gradient_accumulation_steps micro-steps:
        batch = next(data)                              # epochs roll over, set_epoch() is called
        with gradient sync only on the last micro-step, under autocast:
            loss, records = self.forward(batch)
        self.backward(loss)                             # (loss / N).backward(), scaled for fp16
    self.optimizer_step()                               # unscale, clip + grad norm, ONE finite check,
                                                        # step, zero_grad(set_to_none), scheduler

Losses and records stay on the device; hooks reduce them when they report. The only host
read in the loop is one scalar per step: the fused gradient norm for the non-finite check
(switch it off with `max_non_finite_grad_retries=None`), or with fp16 the GradScaler's
overflow flag.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .hooks.base import HOOK_EVENTS, BaseHook, call_each, hook_priority, overridden_events
from .hooks.metrics import RESERVED_NAMES, StepMetrics
from .data import epoch_sampler
from .stream import Event, TrainerEvents
from .precision import autocast_factory, default_grad_scaler, resolve_precision
from .state import check_training_state, optimized_param_names, optimizer_state_by_index, optimizer_state_by_name
from .utils import MetricMeans, check_directory_path, check_int, check_number, flatten_dict, map_nested_tensor, unflatten_dict, unwrap

__all__ = ["BaseTrainer", "NonFiniteGradientError"]

ForwardOutput = tuple["torch.Tensor | None", Mapping[str, Any]]


class NonFiniteGradientError(RuntimeError):
    """Gradients stayed NaN/inf after `max_non_finite_grad_retries` fresh attempts."""


class _EndOfData:
    """Returned by `next_batch` when the epoch limit is reached mid-step."""


END_OF_DATA = _EndOfData()


class BaseTrainer:
    """The training loop. Subclass it, or pass ready objects.

    Args:
        max_steps: optimizer steps to train for (None: until `max_epochs`).
        max_epochs: passes over a finite data loader (None: until `max_steps`).
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        max_non_finite_grad_retries: when a step's gradients are NaN/inf, discard them and
            redo the step with fresh batches up to this many times in a row, then raise
            `NonFiniteGradientError` naming the step. 0 raises at once. None skips the check
            (no host read per step; the optimizer then applies whatever it gets). With fp16
            the GradScaler owns non-finite steps: it skips them and lowers its scale.
        mixed_precision: "fp16", "bf16", "auto" or None (see `mini_trainer.precision`).
        gradient_accumulation_steps: micro-batches per optimizer step; the loss is scaled
            by 1/N so gradients equal one N-times bigger batch.
        workspace: directory for metrics.jsonl, checkpoints and other run files.
        device: "auto" (cuda > mps > cpu), a device string, a `torch.device` or a CUDA index.
        parallelism: how to use several processes (torchrun). "auto" (default): DDP when
            there is more than one process, nothing in a single one. "ddp": wrap the model
            in `DistributedDataParallel`. "fsdp": FSDP2, `fully_shard` on each unit (see
            `fsdp_units`) and on the root; the optimizer must be built by the trainer
            (after sharding), not passed ready. None: never wrap (you manage the model).
            For all but None, a process group is joined from torchrun's environment when
            none exists (NCCL on CUDA, gloo on CPU); a model that is already wrapped (DDP,
            FSDP) is left alone.
        fsdp_units: which submodules get their own `fully_shard`: a tuple of module classes,
            a predicate `fn(module) -> bool`, or None for the items of the outermost
            ModuleList/Sequential (transformer blocks, MLP layers).
        parallel_kwargs: extra keywords for `DistributedDataParallel(...)` (e.g.
            `find_unused_parameters`) or for each `fully_shard(...)` (e.g. `mp_policy`,
            `reshard_after_forward`).
        no_sync_accumulate: skip the gradient all-reduce on non-final micro-steps (DDP and
            FSDP1 `no_sync()`, FSDP2 `set_requires_gradient_sync(False)`).
        state_dict_options: `torch.distributed.checkpoint.state_dict.StateDictOptions` used
            for the model/optimizer state. Default: plain state dicts, and for FSDP2 full
            (unsharded, gathered on CPU) state dicts, so that a checkpoint loads onto any
            number of processes.
        logger: a `logging.Logger` (default: the "mini_trainer" logger).
        seed: seeds python, numpy and torch before anything is built (None: don't seed).
        compile: wrap the model with `torch.compile` (True, or a dict of compile kwargs).
        model, optimizer, data_loader, lr_scheduler, grad_scaler, hooks: ready objects that
            the default `build_*` methods return.
        forward_fn: `forward_fn(model, batch) -> loss | (loss, records)`, used by the
            default `forward`.

    Attributes: `step` (optimizer steps done), `epoch` (current pass over the data),
    `model`, `optimizer`, `lr_scheduler`, `grad_scaler`, `data_loader`, `hooks`, `device`,
    `step_info` (the current step's loss, records, grad_norm, lr, data_time, step_time,
    retries: the blackboard hooks read), `should_stop` (set it to end training after the
    current step).
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
        check_int("max_steps", max_steps, minimum=0, allow_none=True)
        check_int("max_epochs", max_epochs, minimum=0, allow_none=True)
        check_number("grad_clip", grad_clip, positive=True, allow_none=True)
        check_int("max_non_finite_grad_retries", max_non_finite_grad_retries, minimum=0, allow_none=True)
        check_int("gradient_accumulation_steps", gradient_accumulation_steps, minimum=1)
        check_int("seed", seed, minimum=-(2**63), maximum=2**64 - 1, allow_none=True)  # what torch.manual_seed takes
        _check_optional_type("workspace", workspace, (str, Path))
        if workspace is not None:
            check_directory_path("workspace", workspace)
        _check_optional_type("logger", logger, logging.Logger)
        _check_optional_type("model", model, nn.Module)
        _check_optional_type("optimizer", optimizer, torch.optim.Optimizer)
        _check_optional_type("grad_scaler", grad_scaler, torch.amp.GradScaler)
        if not isinstance(compile, (bool, Mapping)):
            raise TypeError(f"compile must be a bool or a dict of torch.compile keywords; got {compile!r}")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"forward_fn must be callable as forward_fn(model, batch); got {forward_fn!r}")
        if hooks is not None and not isinstance(hooks, (list, tuple)):
            raise TypeError(f"hooks must be a list of BaseHook instances; got {type(hooks).__name__}")
        if parallelism not in distributed.PARALLELISM:
            raise ValueError(f"parallelism must be one of {', '.join(map(repr, distributed.PARALLELISM))}; got {parallelism!r}")
        if fsdp_units is not None and not callable(fsdp_units) and not (
            isinstance(fsdp_units, tuple) and all(isinstance(t, type) for t in fsdp_units)
        ):
            raise TypeError(f"fsdp_units must be a tuple of module classes, a function module -> bool, or None; got {fsdp_units!r}")
        if parallel_kwargs is not None and not isinstance(parallel_kwargs, Mapping):
            raise TypeError(f"parallel_kwargs must be a dict of keywords; got {type(parallel_kwargs).__name__}")
        if state_dict_options is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions

            _check_optional_type("state_dict_options", state_dict_options, StateDictOptions)

        self.device = resolve_device(device)
        self.autocast_dtype = resolve_precision(mixed_precision, self.device)
        self.mixed_precision = mixed_precision
        self.max_steps = max_steps
        self.max_epochs = max_epochs
        self.grad_clip = grad_clip
        self.max_non_finite_grad_retries = max_non_finite_grad_retries
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.workspace = Path(workspace) if workspace is not None else None
        self.parallelism = parallelism
        self.fsdp_units = fsdp_units
        self.parallel_kwargs = dict(parallel_kwargs or {})
        self.parallel: str | None = None  # what the model was wrapped in here: None, "ddp" or "fsdp"
        self.no_sync_accumulate = bool(no_sync_accumulate)
        self.state_dict_options = state_dict_options
        self.logger = logger or logging.getLogger("mini_trainer")
        self.seed = seed
        self.compile = compile
        self.forward_fn = forward_fn
        self._given = {
            "model": model,
            "optimizer": optimizer,
            "data_loader": data_loader,
            "lr_scheduler": lr_scheduler,
            "grad_scaler": grad_scaler,
            "hooks": list(hooks) if hooks is not None else None,
        }

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # batches drawn from the current epoch
        self.micro_step = 0  # index of the micro-batch being processed within the step
        self.step_info: dict[str, Any] = {}
        self.should_stop = False
        self.model: nn.Module = None  # type: ignore[assignment]
        self.optimizer: torch.optim.Optimizer = None  # type: ignore[assignment]
        self.lr_scheduler: Any = None
        self.grad_scaler: torch.amp.GradScaler | None = None
        self.data_loader: Iterable = None  # type: ignore[assignment]
        self.hooks: list[BaseHook] = []
        self._built = False
        self._hooks_ready = False
        self._data_iter: Iterator | None = None
        self._skip_batches = 0  # batches to fast-forward after a resume (non-stateful loaders)
        self._loader_restored = False  # the loader's next iterator continues a checkpointed epoch
        self._fit_limits: tuple[int | None, int | None] | None = None  # fit(epochs=, steps=), relative
        self._running = False  # a run is in progress (or suspended: an unfinished events() stream)
        self._restoring_hooks = 0  # on_before_train hooks with a negative priority (they restore state)
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
        return self._given["lr_scheduler"]

    def build_grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler; by default one for fp16 (also on CPU) and None otherwise."""
        if self._given["grad_scaler"] is not None:
            return self._given["grad_scaler"]
        if self.parallel == "fsdp" and self.autocast_dtype == torch.float16:
            # Each rank holds a shard of the gradients: overflow found on one shard must
            # skip the step on every rank, which ShardedGradScaler all-reduces.
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device.type)
        return default_grad_scaler(self.device, self.autocast_dtype)

    def build_hooks(self) -> list[BaseHook]:
        """Hooks for this run (their order does not matter)."""
        return list(self._given["hooks"] or [])

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
            raise NotImplementedError(
                f"{type(self).__name__} runs on {_processes(self.max_processes)}, and this run has {world}: "
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
                raise OSError(err.errno, f"workspace {str(self.workspace)!r} cannot be created: {err.strerror or err}") from None

        model = self.build_model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"build_model() must return an nn.Module; got {type(model).__name__}")
        self.model = self._wrap_for_parallelism(model.to(self.device))
        self._grads_agree = self._world == 1 or distributed.is_wrapped(self.model)
        self.optimizer = self.build_optimizer()
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"build_optimizer() must return a torch.optim.Optimizer; got {type(self.optimizer).__name__}")
        self.data_loader = self.build_data_loader()
        if not isinstance(self.data_loader, Iterable):
            raise TypeError(f"build_data_loader() must return an iterable of batches; got {type(self.data_loader).__name__}")
        self.lr_scheduler = self.build_lr_scheduler()
        if self.lr_scheduler is not None and not callable(getattr(self.lr_scheduler, "step", None)):
            raise TypeError(f"build_lr_scheduler() must return an object with step(); got {self.lr_scheduler!r}")
        self.grad_scaler = self.build_grad_scaler()
        #: the GradScaler that is in use (fp16), or None: what scales the loss and unscales gradients
        if not self._hooks_ready:
            self.hooks = self._prepare_hooks(self.build_hooks())
        if self.compile:
            kwargs = dict(self.compile) if isinstance(self.compile, Mapping) else {}
            self.model = torch.compile(self.model, **kwargs)

        self._autocast_factory = autocast_factory(self.device, self.autocast_dtype)
        self.active_scaler = self.grad_scaler if self.grad_scaler is not None and self.grad_scaler.is_enabled() else None
        self._move_batch = self.device.type != "cpu"
        self._built = True

    def _wrap_for_parallelism(self, model: nn.Module) -> nn.Module:
        self.parallel = distributed.resolve_parallelism(self.parallelism, model)
        if self.parallel is None:
            return model
        if self.parallel == "fsdp" and self._given["optimizer"] is not None:
            raise TypeError(
                "parallelism='fsdp' replaces the model's parameters with sharded ones, so a ready "
                "optimizer= would update the old ones: override build_optimizer() (or use "
                "optimizer_cfg in a config) so that the trainer builds it after sharding"
            )
        return distributed.wrap_model(
            model, self.parallel, self.device, fsdp_units=self.fsdp_units, parallel_kwargs=self.parallel_kwargs
        )

    def _prepare_hooks(self, hooks: Sequence[BaseHook]) -> list[BaseHook]:
        for i, hook in enumerate(hooks):
            if not isinstance(hook, BaseHook):
                raise TypeError(f"hooks[{i}] must be a BaseHook instance; got {type(hook).__name__}")
        # Per event, only the hooks that implement it, in that event's priority order (the
        # sort is stable: equal priorities keep the user's order). An idle hook costs nothing.
        self._hooks_for = {
            event: [getattr(h, event) for h in sorted(hooks, key=lambda h: hook_priority(h, event)) if event in overridden_events(h)]
            for event in HOOK_EVENTS
        }
        self._restoring_hooks = sum(
            1 for h in hooks if "on_before_train" in overridden_events(h) and hook_priority(h, "on_before_train") < 0
        )
        self._hooks_ready = True
        return sorted(hooks, key=hook_priority)

    def _call_hooks(self, event: str, *args: Any) -> None:
        for method in self._hooks_for[event]:
            method(self, *args)

    # ======================================================================= the loop

    def train(self) -> None:
        """Train until `max_steps` optimizer steps or `max_epochs` epochs (whichever first),
        or until a hook sets `should_stop`."""
        for _ in self._training(require_limit=self._fit_limits is None):
            pass

    def _training(self, require_limit: bool) -> Iterator[None]:
        """The run, pausing after each step: `train()` drains it, `events()` turns every
        pause into an event. Closed at a pause, it ends like a run that reached its limit."""
        self.build()
        if require_limit:
            self.check_limits()
        self._check_not_running()
        self._running = True  # until this generator ends: a second run now would corrupt this one
        try:
            yield from self._steps()
        finally:
            self._running = False

    def _steps(self) -> Iterator[None]:
        """Hooks before training, the steps, and the hooks that end the run."""
        self.should_stop = False
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # Hooks that restore state (a checkpoint) run first, at a negative priority; fit()'s
        # relative limits then count from the restored step, and every other hook (progress,
        # ETA, logging) starts from it too.
        before_train = self._hooks_for["on_before_train"]
        try:
            for method in before_train[: self._restoring_hooks]:
                method(self)
            self._apply_fit_limits()
            for method in before_train[self._restoring_hooks :]:
                method(self)
            while not self._finished():
                done = self.step
                self._run_step()
                if self.step > done:  # not when the data ran out before a step could be taken
                    yield
        except GeneratorExit:
            # The consumer of events() stopped asking (take, early_stop, a break) between
            # two steps: an ordinary end, so the final checkpoint and logs are written.
            self._end_run()
            raise
        except BaseException as error:
            # Let every hook flush and release what it holds (metrics, progress bar, files,
            # signal handlers, the directory lock), even if one of them fails; the error wins.
            call_each(self._hooks_for["on_exception"], self, error, logger=self.logger, return_first=False)
            if not isinstance(error, SystemExit):  # a preemption's exit is agreed by all ranks; errors are not
                distributed.note_failed_run()
            raise
        self._end_run()

    def _end_run(self) -> None:
        """Every hook's on_after_train, also after one failed; the first failure is raised."""
        error = call_each(self._hooks_for["on_after_train"], self, logger=self.logger)
        if error is not None:
            raise error

    def events(self, *, epochs: int | None = None, steps: int | None = None) -> TrainerEvents:
        """Train lazily: an iterator of one event (a dict) per optimizer step, for the
        `mini_trainer.stream` stages (`take`, `early_stop`, `augment`, `collect_jsonl`...).

        Each event holds `step`, `epoch`, everything in `step_info` (`loss`, `records`,
        `grad_norm`, `lr`, `data_time`, `step_time`, `retries`, what hooks add), `model`
        (unwrapped from DDP/compile) and `trainer`. Loss and metrics are device tensors:
        a stage that reads them (`float(...)`) syncs the host, nothing else does.

        Hooks run as in `train()`. A step runs when the next event is asked for. The run
        ends at `epochs`/`steps` more (relative, as in `fit()`), at the constructor's
        limits, or, with no limit at all, when `take` or `early_stop` stops the stream (they
        close it): `on_after_train` runs then and there (final checkpoint, last log; what it
        raises, such as a preemption exit, reaches you). An error in a `pipe` stage ends the
        run through `on_exception`. A stream you stop yourself (`break`) is ended by
        `close()`, by leaving `with trainer.events() as events:` (an error in the block
        counts as the run's error), or else at garbage collection, where errors are lost;
        until then the trainer refuses to start another run. Under torchrun every rank must
        stop at the same event (decide on synced metrics).
        """
        check_int("epochs", epochs, minimum=1, allow_none=True)
        check_int("steps", steps, minimum=1, allow_none=True)
        self._check_not_running()
        return TrainerEvents(self._step_events(epochs, steps))

    def _step_events(self, epochs: int | None, steps: int | None) -> Iterator[dict[str, Any]]:
        self.build()
        self._check_not_running()
        model = self.unwrapped_model
        limits = self.max_steps, self.max_epochs
        if epochs is not None or steps is not None:
            self._fit_limits = (epochs, steps)  # applied once a checkpoint is restored
        run = self._training(require_limit=False)
        try:
            for _ in run:
                try:
                    yield Event(self.step_info, step=self.step, epoch=self.epoch, model=model, trainer=self)
                except GeneratorExit:
                    raise
                except BaseException as error:
                    # Raised in the consumer (`with trainer.events()` hands it over): the
                    # run ends with that error, and hooks see it in on_exception.
                    run.throw(error)
        finally:
            run.close()  # a stopped consumer: on_after_train runs now, not at garbage collection
            self.max_steps, self.max_epochs = limits
            self._fit_limits = None

    def _check_not_running(self) -> None:
        if self._running:
            raise RuntimeError(
                "this trainer is still in a run: a stream from trainer.events() was left unfinished "
                "(a break, an error outside a stage, or a variable still holding it). Close it first "
                "(events.close()), or use `with trainer.events() as events:` so that it closes itself"
            )

    def _apply_fit_limits(self) -> None:
        if self._fit_limits is None:
            return
        epochs, steps = self._fit_limits
        self._roll_over_if_epoch_done()
        self.max_epochs = self.epoch + epochs if epochs is not None else None
        self.max_steps = self.step + steps if steps is not None else None

    def check_limits(self) -> None:
        """Raise unless training has an end (`max_steps` or `max_epochs`)."""
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("train() needs a limit: set max_steps or max_epochs (or call fit(steps=..., epochs=...))")

    def _finished(self) -> bool:
        if self.should_stop:
            return True
        if self.max_steps is not None and self.step >= self.max_steps:
            return True
        if self.max_epochs is None:
            return False
        self._roll_over_if_epoch_done()
        return self.epoch >= self.max_epochs

    def _run_step(self) -> None:
        """One optimizer step, redone with fresh batches while gradients are non-finite."""
        # A fresh dict per step: hooks may keep a reference to the previous one.
        info = self.step_info = {"retries": 0, "data_time": 0.0}
        self._call_hooks("on_before_step")
        started = time.perf_counter()
        while True:
            if not self.accumulate_gradients(info):
                # The epoch limit came before any micro-batch (loaders without a length,
                # or a retry that needed more data).
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
        self._call_hooks("on_after_step")
        if self._world > 1:
            # A hook may ask one rank to stop (early stopping on its metric, a time limit):
            # a rank that stopped alone would leave the others waiting in the next all-reduce.
            self.should_stop = bool(distributed.agree_max(int(self.should_stop)))

    def accumulate_gradients(self, info: dict[str, Any]) -> bool:
        """Run the micro-steps of one optimizer step; False when no batch was left."""
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
            sync = micro_step == n - 1 or not self.no_sync_accumulate or self._last_batch_of_training()
            with distributed.gradient_sync(self.model, sync) if n > 1 else _NULL:
                with self.autocast():
                    loss, records = self._check_forward_output(self.forward(batch))
                if loss is not None:
                    self.backward(loss)
                    losses.append(loss.detach())
                    synced = synced or sync
            all_records.append(records)
        if not all_records:
            return False
        if losses and not synced:
            # The micro-step that would have all-reduced produced no loss (or the data
            # ended first): sync by hand. Ranks agree, since under DDP every rank must run
            # the same backward passes anyway.
            distributed.all_reduce_gradients(self.model, self.optimized_params)
        if losses and len(losses) < n:
            # Skipped micro-steps (None loss, end of data): average over the ones that ran.
            grads = [p.grad for p in self.optimized_params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, n / len(losses))
        info["loss"] = _mean(losses)
        info["records"] = all_records[0] if len(all_records) == 1 else _average_on_device(all_records)
        info["micro_steps"] = len(losses)
        return True

    def _last_batch_of_training(self) -> bool:
        """Whether the batch just drawn is the last one `max_epochs` allows (known only for
        loaders with a length)."""
        if self.max_epochs is None or self.epoch + 1 < self.max_epochs:
            return False
        per_epoch = _length(self.data_loader)
        return bool(per_epoch) and self.batch_in_epoch >= per_epoch

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
        """Unscale, clip, check, step, zero the gradients and step the scheduler.

        Returns False (and discards the gradients) when they are non-finite and the
        trainer handles that with retries; True when the step was taken (for fp16 the
        scaler may still skip the update internally, which is not a failure).
        """
        scaler = self.active_scaler
        overflowed = False
        if scaler is not None:
            scaler.unscale_(self.optimizer)
            # The one host read of an fp16 step: the scaler's own overflow flag (it reads it
            # again in step()); an overflowing step is skipped, so the schedule waits too.
            overflowed = _scaler_found_inf(scaler, self.optimizer)
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
        before the optimizer uses them; `skipped` when an fp16 overflow makes the scaler
        skip this update. Does nothing here; a subclass may read them (PhaseTrainer records
        them for its predictor)."""

    def clip_and_measure_gradients(self) -> torch.Tensor | None:
        """Global gradient norm (after unscaling), clipping in place when `grad_clip` is set.
        Skipped entirely when neither clipping nor the finite check needs it."""
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.optimized_params, self.grad_clip, foreach=True)
        elif self.max_non_finite_grad_retries is None or self.active_scaler is not None:
            return None  # nobody needs it: fp16 overflow is the scaler's business
        else:
            grads = [p.grad for p in self.optimized_params if p.grad is not None]
            if not grads:
                return torch.zeros((), device=self.device)
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        # FSDP2 gradients are sharded DTensors: their norm is already the global one (all
        # ranks' shards reduced), replicated; hooks get it as a plain tensor.
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

    def _check_forward_output(self, out: Any) -> tuple[torch.Tensor | None, Mapping[str, Any]]:
        if not isinstance(out, tuple) or len(out) != 2:
            got = f"a tuple of length {len(out)}" if isinstance(out, tuple) else type(out).__name__
            raise TypeError(
                f"{type(self).__name__}.forward must return a tuple (loss, records) with loss a "
                f"scalar tensor or None and records a dict; got {got}"
            )
        loss, records = out
        if loss is not None:
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"forward returned a loss of type {type(loss).__name__}; it must be a scalar tensor or None")
            if loss.ndim != 0:
                raise ValueError(
                    f"forward returned a loss of shape {tuple(loss.shape)}; it must be a scalar "
                    "(0-d) tensor: reduce it, e.g. loss.mean()"
                )
        if not records:
            return loss, {}
        if not isinstance(records, Mapping):
            raise TypeError(f"forward returned records of type {type(records).__name__}; they must be a dict")
        if not RESERVED_NAMES.isdisjoint(records):
            clash = sorted(RESERVED_NAMES.intersection(records))
            raise ValueError(f"forward returned records named {clash}: these names are the trainer's own step metrics; rename them")
        # Hooks keep records for a whole interval: they must not keep autograd graphs alive.
        if any(isinstance(v, torch.Tensor) and v.requires_grad or isinstance(v, Mapping) for v in records.values()):
            records = map_nested_tensor(torch.Tensor.detach, records)
        return loss, records

    # ======================================================================= data

    def next_batch(self) -> Any:
        """Next batch on the device; finite loaders roll over into the next epoch."""
        fresh = self._data_iter is None
        if fresh:
            self._data_iter = self._start_epoch()
        try:
            batch = next(self._data_iter)
        except StopIteration:
            # A fresh iterator that is empty at once is a stateful loader restored at the very
            # end of its epoch: count that epoch as done unless the trainer already has
            # (batch_in_epoch is 0 once an epoch is counted).
            if not fresh or self.batch_in_epoch > 0:
                self._roll_over_epoch()
                if self.max_epochs is not None and self.epoch >= self.max_epochs:
                    return END_OF_DATA
            self._data_iter = self._start_epoch()
            try:
                batch = next(self._data_iter)
            except StopIteration:
                raise ValueError(
                    f"data_loader yielded no batches in epoch {self.epoch}: it is empty or cannot be "
                    "restarted (a generator?); use a re-iterable loader such as a DataLoader"
                ) from None
        self.batch_in_epoch += 1
        if self._move_batch:
            device = self.device
            batch = map_nested_tensor(lambda t: t.to(device, non_blocking=True), batch)
        return batch

    def _roll_over_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self._data_iter = None
        self._skip_batches = 0

    def _roll_over_if_epoch_done(self) -> None:
        """Close an epoch whose last batch was drawn, when the loader's length says so:
        training for whole epochs then ends without starting a step that finds no data."""
        per_epoch = _length(self.data_loader)
        if per_epoch and self.batch_in_epoch >= per_epoch:
            self._roll_over_epoch()

    def _start_epoch(self) -> Iterator:
        """Tell samplers which epoch this is (so shuffles differ per epoch), then iterate."""
        loader = self.data_loader
        seen: set[int] = set()
        batch_sampler = getattr(loader, "batch_sampler", None)
        for obj in (
            loader,
            getattr(loader, "sampler", None),
            batch_sampler,
            getattr(batch_sampler, "sampler", None),
            getattr(loader, "dataset", None),
        ):
            if obj is not None and id(obj) not in seen and callable(getattr(obj, "set_epoch", None)):
                seen.add(id(obj))
                obj.set_epoch(self.epoch)
        if not (self._loader_restored or self._skip_batches):
            return iter(loader)
        # Continuing an epoch after a resume. The uninterrupted run created this epoch's
        # iterator before the checkpoint was taken, and creating one draws from the global
        # RNG (a DataLoader draws its worker seed): draw again now and every later random
        # number (dropout masks, ...) would shift. So the global RNG is put back afterwards.
        saved = rng_state()
        iterator = iter(loader)
        # A loader that cannot save its position skips the batches already trained on
        # (the same ones only if its order is seeded per epoch; a StatefulDataLoader
        # resumes exactly).
        for _ in range(self._skip_batches):
            next(iterator, None)
        set_rng_state(saved)
        self._loader_restored = False
        self._skip_batches = 0
        return iterator

    def estimated_total_steps(self) -> int | None:
        """`max_steps`, or the steps `max_epochs` amount to when the loader has a length."""
        estimate = None
        if self.max_epochs is not None:
            per_epoch = _length(self.data_loader)
            if per_epoch:
                batches_left = (self.max_epochs - self.epoch) * per_epoch - self.batch_in_epoch
                estimate = self.step + math.ceil(max(batches_left, 0) / self.gradient_accumulation_steps)
        if self.max_steps is not None:
            return self.max_steps if estimate is None else min(estimate, self.max_steps)
        return estimate

    # ======================================================================= fit API

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
            # A new loader, or one a subclass's build_data_loader did not return.
            self.data_loader = data_loader
            self._data_iter = None
            self.batch_in_epoch = 0
        limits = self.max_steps, self.max_epochs
        if epochs is not None or steps is not None:
            self._fit_limits = (epochs, steps)  # applied by train() once a checkpoint is restored
        metrics = StepMetrics()  # averages over this call, read once at the end

        def collect(trainer: BaseTrainer) -> None:
            metrics.add(trainer.step_info)

        self._hooks_for["on_after_step"].append(collect)
        try:
            self.train()
        finally:
            self._hooks_for["on_after_step"].remove(collect)
            self.max_steps, self.max_epochs = limits
            self._fit_limits = None
        return {**metrics.compute(), "step": self.step, "epoch": self.epoch}

    # ======================================================================= logging

    def log(self, records: Mapping[str, Any], dry_run: bool = False) -> None:
        """Send aggregated metrics to every hook's `on_log` (W&B, metrics.jsonl, ...)."""
        self._build_hooks_only()
        self._call_hooks("on_log", records, dry_run)

    def log_images(self, records: Mapping[str, Any], dry_run: bool = False) -> None:
        """Send `{name: image}` to every hook's `on_log_images`."""
        self._build_hooks_only()
        self._call_hooks("on_log_images", records, dry_run)

    def _build_hooks_only(self) -> None:
        """Logging before training needs the hooks, not the model or the data."""
        if not self._hooks_ready:
            self.hooks = self._prepare_hooks(self.build_hooks())

    # ======================================================================= state

    def state_dict(self, *, sharded: bool = False) -> dict[str, Any]:
        """Everything needed to continue this run exactly: model, optimizer, scheduler,
        scaler, counters, data-loader position (when the loader has `state_dict()`), RNG
        states and each hook's state under `"hooks"`.

        Every rank must call it in a distributed run (gathering is collective). Rank 0's
        result holds what a checkpoint needs: the full model and optimizer state (FSDP2
        shards gathered; with `sharded=True` each rank keeps its own DTensor shards, for
        `torch.distributed.checkpoint`), and each rank's RNG and data-loader state under
        `"ranks"`, so that every rank resumes its own stream.
        """
        self.build()
        model_state, optim_state = self.model_and_optimizer_state(sharded)
        local = {
            "rng": rng_state(),
            "data_loader": self.data_loader.state_dict() if callable(getattr(self.data_loader, "state_dict", None)) else None,
        }
        state: dict[str, Any] = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self._world,
            "data_position": self._data_position(),
            "model": model_state,
            "optimizer": optim_state,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            **local,
            "hooks": {},
        }
        if self._world > 1:
            state["ranks"] = distributed.gather_objects(local)
        self._call_hooks("on_state_dict", state)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], *, sharded: bool = False) -> None:
        """Restore what `state_dict()` returned; training continues from `state_dict["step"]`.

        Onto as many processes as saved it, each rank takes back its own RNG and loader
        state. Onto a different number (2 -> 1, 1 -> 2: the global batch is yours to
        keep, e.g. double the per-rank batch size when halving the processes), an
        `EpochShuffleSampler` loader continues the epoch after the samples all ranks had
        trained on; other loaders restart the epoch's position by batch count (with a
        warning). `sharded=True` takes model/optimizer DTensor shards (`state_dict(sharded=True)`).
        A state that does not fit (see `check_state_dict`) raises before anything is assigned.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict expects a dict from state_dict(); got {type(state_dict).__name__}")
        self.check_state_dict(state_dict, sharded=sharded)
        self._load_model_and_optimizer_state(state_dict["model"], state_dict["optimizer"], sharded)
        if self.lr_scheduler is not None and state_dict.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state_dict["lr_scheduler"])
        if self.grad_scaler is not None and state_dict.get("grad_scaler") is not None:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        self.step = int(state_dict["step"])
        self.epoch = int(state_dict.get("epoch", 0))
        self.batch_in_epoch = int(state_dict.get("batch_in_epoch", 0))
        self._data_iter = None

        saved_world = int(state_dict.get("world_size", 1))
        rank = distributed.get_rank()
        ranks = state_dict.get("ranks") or [state_dict]
        # This rank's own streams when it existed in the saved run; otherwise rank 0's.
        local = ranks[rank] if rank < len(ranks) else ranks[0]
        if saved_world == self._world:
            self._restore_data_position(state_dict.get("data_position"), local.get("data_loader"))
        else:
            self._move_data_position(state_dict.get("data_position"), saved_world)
        if local.get("rng") is not None:
            set_rng_state(local["rng"])
        self._call_hooks("on_load_state_dict", state_dict)

    def check_state_dict(self, state_dict: Mapping[str, Any], *, sharded: bool = False) -> None:
        """Raise `CheckpointError` unless `state_dict` fits this trainer: counters are
        integers >= 0, the model tensors have this model's names and shapes, the optimizer
        state this optimizer's groups and shapes (see `mini_trainer.state`). Loading from
        a run's checkpoints uses it to fall back to an older checkpoint that does fit."""
        self.build()
        strict = getattr(self.state_dict_options, "strict", True)
        check_training_state(state_dict, self.unwrapped_model, self.optimizer, sharded=sharded, strict=strict)

    def _data_position(self) -> dict[str, int] | None:
        """Where this epoch stands over all ranks, in samples of the shared permutation
        (only for loaders ordered by an `EpochShuffleSampler` with a fixed batch size)."""
        sampler = epoch_sampler(self.data_loader)
        batch_size = getattr(self.data_loader, "batch_size", None)
        if sampler is None or not batch_size:
            return None
        start = sampler.start if sampler.start_epoch == self.epoch else 0
        return {"epoch_start": start, "samples": start + self.batch_in_epoch * batch_size * self._world}

    def _restore_data_position(self, position: Mapping[str, int] | None, loader_state: Any) -> None:
        sampler = epoch_sampler(self.data_loader)
        if sampler is not None and position is not None and position.get("epoch_start"):
            sampler.resume_at(self.epoch, int(position["epoch_start"]))  # an epoch continued from another world size
        loader_resumes = loader_state is not None and callable(getattr(self.data_loader, "load_state_dict", None))
        if loader_resumes:
            self.data_loader.load_state_dict(loader_state)
        # A loader that cannot restore its position is fast-forwarded to it instead.
        self._skip_batches = 0 if loader_resumes else self.batch_in_epoch
        if self._skip_batches and type(getattr(self.data_loader, "sampler", None)) is torch.utils.data.RandomSampler:
            self.logger.warning(
                "resuming mid-epoch with a shuffling DataLoader that cannot save its order: the rest of "
                "epoch %d comes in a different order than before the interruption (use "
                "mini_trainer.data.stateful_loader for an exact resume)", self.epoch,
            )
        self._loader_restored = loader_resumes

    def _move_data_position(self, position: Mapping[str, int] | None, saved_world: int) -> None:
        """Resume onto a different number of processes: the saved per-rank loader states
        do not apply; the epoch continues after the samples the saved run consumed."""
        sampler = epoch_sampler(self.data_loader)
        self._loader_restored = False
        if sampler is not None and position is not None:
            sampler.set_epoch(self.epoch)  # its length below is this epoch's
            sampler.resume_at(self.epoch, int(position["samples"]))
            self.batch_in_epoch = 0  # counted from the new start of this epoch
            self._skip_batches = 0
            if _length(self.data_loader) == 0:
                self._roll_over_epoch()  # saved at the end of the epoch: nothing of it is left
            return
        self._skip_batches = self.batch_in_epoch
        if self.batch_in_epoch:
            self.logger.warning(
                "resuming on %d process(es) a run saved on %d mid-epoch, with a loader that is not ordered by "
                "mini_trainer.data.EpochShuffleSampler: the position in epoch %d is kept as a batch count "
                "(%d batches skipped), so samples may repeat or be missed until the epoch ends",
                self._world, saved_world, self.epoch, self.batch_in_epoch,
            )

    def _state_dict_options(self, sharded: bool) -> Any:
        """The `StateDictOptions` to go through DCP's get/set_state_dict with, or None for
        the modules' own state dicts."""
        if self.state_dict_options is not None and not sharded:
            return self.state_dict_options
        if not (sharded or distributed.is_fsdp2(self.model)):
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if sharded:
            return StateDictOptions(full_state_dict=False)
        # Gathered on CPU (rank 0 keeps it, the others get empty dicts): one portable file
        # that loads onto any number of processes, with or without FSDP.
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_and_optimizer_state(self, sharded: bool = False) -> tuple[dict, dict]:
        """The model's and the optimizer's state dicts, as `state_dict()` holds them (with
        `sharded=True`, this rank's DTensor shards: what DCP saves and loads into)."""
        options = self._state_dict_options(sharded)
        if options is not None:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            return get_state_dict(self.model, self.optimizer, options=options)
        return self.unwrapped_model.state_dict(), self.optimizer.state_dict()

    def _load_model_and_optimizer_state(self, model_state: Mapping, optim_state: Mapping, sharded: bool = False) -> None:
        options = self._state_dict_options(sharded)
        names = optimized_param_names(self.unwrapped_model, self.optimizer)
        if options is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            if options.full_state_dict:
                # Every rank read the whole checkpoint: each takes its shard, no broadcast.
                options = StateDictOptions(**{**vars(options), "cpu_offload": False, "broadcast_from_rank0": False})
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=model_state,
                optim_state_dict=optimizer_state_by_name(optim_state, names),
                options=options,
            )
            return
        self.unwrapped_model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optimizer_state_by_index(optim_state, names))

    # ======================================================================= models

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The plain module under torch.compile / DDP / FSDP1 / AveragedModel wrappers."""
        return unwrap(model)

    @property
    def unwrapped_model(self) -> nn.Module:
        """`self.model` without its torch.compile / DDP / FSDP1 wrappers."""
        return unwrap(self.model)

    @property
    def is_built(self) -> bool:
        """Whether `build()` has run (it runs once; a subclass's `build()` override checks
        this before doing its own work after `super().build()`)."""
        return self._built

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context `forward` runs in (a no-op without mixed precision); use it
        for any extra forward pass a strategy or evaluation makes."""
        return self._autocast_factory()


# =========================================================================== helpers


_NULL = contextlib.nullcontext()  # reusable: it holds no state


def _mean(losses: list[torch.Tensor]) -> torch.Tensor | None:
    if not losses:
        return None
    if len(losses) == 1:
        return losses[0]
    return torch.stack([l.float() for l in losses]).mean()


def _average_on_device(all_records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Average micro-step records key by key (NaN/inf skipped) without leaving the device."""
    columns: dict[str, list[Any]] = {}
    for records in all_records:
        for key, value in flatten_dict(records).items():
            columns.setdefault(key, []).append(value)
    averaged: dict[str, Any] = {}
    for key, values in columns.items():
        means = MetricMeans()
        means.extend(key, values)
        averaged[key] = means.device_mean(key)
    return unflatten_dict(averaged)


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether `scaler.unscale_(optimizer)` found inf/NaN gradients."""
    found = scaler._found_inf_per_device(optimizer)
    return bool(sum(v.item() for v in found.values()))


def _processes(limit: int) -> str:
    return "one process" if limit == 1 else f"at most {limit} processes"


def _check_optional_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    if value is not None and not isinstance(value, types):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise TypeError(f"{name} must be a {names} or None; got {type(value).__name__} {value!r}")


def resolve_device(device: str | torch.device | int) -> torch.device:
    """"auto" -> cuda (this rank's LOCAL_RANK under torchrun) > mps > cpu. A "cuda"
    without an index is this rank's GPU too."""
    resolved = _resolve_device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = "built with CUDA, but no GPU is visible" if torch.backends.cuda.is_built() else "a build without CUDA"
            raise ValueError(f"device={device!r} asks for CUDA, which is not available here (torch {torch.__version__}: {built}); use device='cpu' or 'auto'")
        if resolved.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % count)
        if resolved.index >= count:
            raise ValueError(f"device={device!r}: there is no GPU {resolved.index} here ({count} visible: 0..{count - 1})")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} asks for Apple's MPS, which is not available here; use device='cpu' or 'auto'")
    return resolved


def _resolve_device(device: str | torch.device | int) -> torch.device:
    if isinstance(device, bool):
        raise TypeError(f"device must be 'auto', a device string, a torch.device or a CUDA index; got {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device index must be >= 0; got {device}")
        return torch.device("cuda", device)
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', a device string, a torch.device or a CUDA index; got {type(device).__name__}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")  # this rank's, see resolve_device
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps', ...; got {device!r} ({err})") from None


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy (when installed) and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU, every CUDA device)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        # The key array as a tensor: the state then holds only types that safetensors/JSON
        # and `torch.load(weights_only=True)` accept.
        state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian)
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"].clone())  # a view with an offset would be misread
    if "numpy" in state:
        import numpy as np

        name, keys, position, has_gauss, cached_gaussian = state["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((name, keys.astype(np.uint32), int(position), int(has_gauss), float(cached_gaussian)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.clone() for s in state["cuda"]])


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples back where a JSON round trip made lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
