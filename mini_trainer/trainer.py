"""BaseTrainer: the step loop, told top to bottom. One optimizer step (`run_step`):

    accumulate_gradients():                             # N = gradient_accumulation_steps
        for each of the N micro-steps:
            batch = next_batch()                        # epochs roll over, set_epoch() is called
            with gradient sync only on the last micro-step, under autocast():
                loss, records = forward(batch)
            backward(loss)                              # (loss / N).backward(), scaled for fp16
    optimizer_step():                                   # unscale (fp16), then
        clip_and_measure_gradients()                    # ONE finite check; non-finite: redo the step
        gradients_ready(skipped)                        # the final gradients, for strategies
        optimizer.step(); zero_grad(set_to_none); scheduler.step()

Losses and records stay on the device; the one host read per step is the finite check's
scalar (the fused gradient norm, or fp16's overflow flag). Components own the mechanics
(`data_cursor`, `gradients`, `precision`, `state`, `rng`, `metrics`, `evaluation`,
`hooks.base.HookDispatcher`); docs/strategies.md is the surface strategies use.
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

from . import arguments, distributed, evaluation, gradients, precision, state
from .arguments import STILL_RUNNING, check_built, check_run_arguments, check_scheduler, check_trainer_arguments
from .data_cursor import END_OF_DATA, DataCursor, cursor_field
from .evaluation import check_eval_loaders
from .gradients import NonFiniteGradientError
from .hooks.base import BaseHook, HookDispatcher
from .metrics import ForwardOutput, StepMetrics, average_records, check_forward_output, count_samples, mean_loss
from .precision import resolve_device
from .rng import rng_state, seed_everything, set_rng_state
from .state import optimizer_state_by_index, optimizer_state_by_name  # noqa: F401 - importable from here, as before
from .stream import TrainerEvents
from .utils import check_choice, create_directory, unwrap

__all__ = ["END_OF_DATA", "BaseTrainer", "NonFiniteGradientError", "resolve_device", "rng_state", "seed_everything",
           "set_rng_state"]


class BaseTrainer:
    """The training loop: subclass it and implement `build_model`, `build_optimizer`,
    `build_data_loader` and `forward`, or pass ready objects (every argument: docs/trainer.md).

    Args (the rest: docs/trainer.md):
        max_steps / max_epochs: steps / passes over the data to train for (first one ends it).
        max_non_finite_grad_retries: redo a step whose gradients are NaN/inf with fresh batches
            up to this many times, then raise `NonFiniteGradientError` (None: no check).
        model, optimizer, data_loader, eval_loaders, lr_scheduler, grad_scaler, hooks, forward_fn: ready objects.

    Attributes: `step`, `epoch`, `batch_in_epoch`, `model`, `optimizer`, `lr_scheduler`,
    `grad_scaler`, `data_loader`, `hooks`, `device`, `step_info` (this step's loss, records,
    grad_norm, lr, timings, retries: what hooks read), `should_stop` (ends the run after this step).
    """

    #: The most processes this trainer runs on (None: any); a strategy sets 1 and says why.
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
        eval_loaders: Iterable | Mapping[str, Iterable] | None = None,
        lr_scheduler: Any = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        hooks: Sequence[BaseHook] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        check_trainer_arguments(locals())  # every argument, before anything is built
        self.device = resolve_device(device)
        self.mixed_precision = mixed_precision
        self.autocast_dtype = precision.resolve_precision(mixed_precision, self.device)
        self.max_steps, self.max_epochs, self.grad_clip = max_steps, max_epochs, grad_clip
        self.max_non_finite_grad_retries = max_non_finite_grad_retries
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.workspace = Path(workspace) if workspace is not None else None
        self.parallelism, self.fsdp_units, self.parallel_kwargs = parallelism, fsdp_units, dict(parallel_kwargs or {})
        self.parallel: str | None = None  # what the model was wrapped in here: None, "ddp" or "fsdp"
        self.no_sync_accumulate, self.state_dict_options = bool(no_sync_accumulate), state_dict_options
        self.logger = logger or logging.getLogger("mini_trainer")
        self.seed, self.compile, self.forward_fn = seed, compile, forward_fn
        self._given = dict(model=model, optimizer=optimizer, data_loader=data_loader, eval_loaders=eval_loaders,
                           lr_scheduler=lr_scheduler, grad_scaler=grad_scaler, hooks=list(hooks) if hooks else None)
        self.step, self.micro_step = 0, 0  # optimizer steps done; the micro-batch within the step
        self.step_info: dict[str, Any] = {}
        self.should_stop = False
        self.data_cursor = DataCursor(None, self.device, self.logger)  # epoch, batch_in_epoch, iterator
        self.eval_loaders: dict[str, Iterable] = {}  # what evaluate() scores: {split: loader}
        self.model: nn.Module = None  # type: ignore[assignment]
        self.optimizer: torch.optim.Optimizer = None  # type: ignore[assignment]
        self.lr_scheduler: Any = None
        self.grad_scaler = self.active_scaler = None  # active_scaler: the enabled one, which scales losses
        self.hooks: list[BaseHook] = []
        self._dispatch: HookDispatcher | None = None  # calls the hooks, once built
        self._built = self._running = False  # _running: also while an events() stream is unfinished
        self._optimized, self._world = gradients.OptimizedParams(), 1
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

    def build_eval_loaders(self) -> Iterable | Mapping[str, Iterable] | None:
        """The held-out splits `evaluate()` scores, `{"val": loader, ...}` (one loader is the split
        "val"), or None; every rank gets the same loaders (docs/evaluation.md)."""
        return self.given("eval_loaders")

    def build_lr_scheduler(self) -> Any:
        """An LR scheduler stepped once per optimizer step, or None."""
        return self.given("lr_scheduler")

    def build_grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler; by default one for fp16 (also on CPU; sharded under FSDP2), else None."""
        return self.given("grad_scaler") or precision.grad_scaler_for(self.device, self.autocast_dtype, self.parallel)

    def build_hooks(self) -> list[BaseHook]:
        """Hooks for this run (their order does not matter)."""
        return list(self.given("hooks") or [])

    def given(self, name: str, *, required: bool = False) -> Any:
        """The ready object passed to the constructor as `name` (`required`: or a clear error)."""
        check_choice("given(name)", name, tuple(self._given))
        value = self._given[name]
        if value is None and required:
            raise NotImplementedError(f"{type(self).__name__} has no {name}: pass {name}=... to the constructor "
                                      f"or override build_{name}()")
        return value

    def build(self) -> None:
        """Build everything, once: process group -> seed -> model (moved, wrapped) -> optimizer ->
        data -> scheduler -> scaler -> hooks. Seeding first makes weights and data order
        reproducible (FSDP2 needs one model on every rank); the optimizer comes after wrapping
        because FSDP2 replaces the parameters; a scheduler may size itself from the data."""
        if self._built:
            return
        distributed.check_process_limit(type(self).__name__, self.max_processes, self.max_processes_reason)
        if self.parallelism is not None:
            distributed.init_from_env(self.device)
        self._world = distributed.get_world_size()
        if self.seed is not None:
            seed_everything(self.seed)
        if self.workspace is not None and distributed.is_main_process():
            create_directory("workspace", self.workspace)
        model = check_built("build_model()", self.build_model(), nn.Module, "an nn.Module")
        self.model, self.parallel = distributed.prepare_model(
            model, self.parallelism, self.device, fsdp_units=self.fsdp_units, parallel_kwargs=self.parallel_kwargs,
            optimizer_given=self._given["optimizer"] is not None)
        self._grads_agree = self._world == 1 or distributed.is_wrapped(self.model)
        self.optimizer = check_built("build_optimizer()", self.build_optimizer(), torch.optim.Optimizer, "an Optimizer")
        self.data_cursor.loader = check_built("build_data_loader()", self.build_data_loader(), Iterable, "an iterable")
        self.eval_loaders = check_eval_loaders(self.build_eval_loaders(), "build_eval_loaders()") or {}
        self.lr_scheduler = check_scheduler(self.build_lr_scheduler())
        self.grad_scaler = self.build_grad_scaler()
        self._build_hooks()
        if self.compile:
            self.model = torch.compile(self.model, **(dict(self.compile) if isinstance(self.compile, Mapping) else {}))
        self._autocast_factory = precision.autocast_factory(self.device, self.autocast_dtype)
        self.active_scaler = precision.enabled_scaler(self.grad_scaler)
        self._built = True

    def _build_hooks(self) -> HookDispatcher:
        """The hooks, built once (logging before training needs them, not the model)."""
        if self._dispatch is None:
            self._dispatch = HookDispatcher(self.build_hooks())
            self.hooks = self._dispatch.hooks  # in run order
        return self._dispatch

    # ======================================================================= the run

    def train(self) -> None:
        """Train until `max_steps` or `max_epochs` (first one), or until `should_stop`."""
        for _ in self._run(require_limit=True):
            pass

    def fit(self, data_loader: Iterable | None = None, *, epochs: int | None = None,
            steps: int | None = None) -> dict[str, Any]:
        """Train `epochs` more epochs and/or `steps` more steps (first one ends it; a started epoch
        counts as one; neither: the constructor's limits); return the metrics averaged over them,
        plus `step` and `epoch`. A `data_loader` given here replaces the current one (a new epoch)."""
        check_run_arguments(epochs, steps, data_loader)
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
        """Train lazily: one event (`step`, `epoch`, `step_info`'s entries, `model`, `trainer`) per step
        for `mini_trainer.stream`, until `epochs`/`steps` more, the limits, or close() (docs/stream.md)."""
        check_run_arguments(epochs, steps)
        self._check_not_running()
        return TrainerEvents.of_run(self._run(epochs, steps, require_limit=False), self)

    def _run(self, epochs: int | None = None, steps: int | None = None, *, require_limit: bool) -> Iterator[None]:
        """The one run `train()`, `fit()` and `events()` drain, pausing after each step (closed at
        a pause, it ends like a reached limit); `epochs`/`steps` count from the restored step."""
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
            # Every hook hears how the run ended: on_after_train for a reached limit, a stop or
            # a closed events() stream; on_exception (each hook, even if one fails) for an error.
            with hooks.running(self, self.logger):
                hooks.before_train(self, after_restoring=lambda: self._set_relative_limits(epochs, steps))
                while not self._finished():
                    done = self.step
                    self.run_step()
                    if self.step > done:  # not when the data ran out before a step could be taken
                        yield
        finally:
            self._running = False
            if epochs is not None or steps is not None:
                self.max_steps, self.max_epochs = limits

    def _check_not_running(self) -> None:
        if self._running:
            raise RuntimeError(STILL_RUNNING)

    def _set_relative_limits(self, epochs: int | None, steps: int | None) -> None:
        if epochs is not None or steps is not None:
            self.data_cursor.roll_over_if_epoch_done()  # a finished epoch does not count as one more
            self.max_epochs = self.epoch + epochs if epochs is not None else None
            self.max_steps = self.step + steps if steps is not None else None

    def check_limits(self) -> None:
        """Raise unless training has an end (`max_steps` or `max_epochs`)."""
        arguments.check_limits(self.max_steps, self.max_epochs)

    def _finished(self) -> bool:
        if self.should_stop or (self.max_steps is not None and self.step >= self.max_steps):
            return True
        return self.max_epochs is not None and self.data_cursor.reached(self.max_epochs)

    def estimated_total_steps(self) -> int | None:
        """`max_steps`, or the steps `max_epochs` amount to when the loader has a length."""
        cursor, accumulation = self.data_cursor, self.gradient_accumulation_steps
        return cursor.total_steps(self.step, self.max_steps, self.max_epochs, accumulation)

    # ======================================================================= the step

    def run_step(self) -> None:
        """One optimizer step, redone with fresh batches while gradients are non-finite."""
        info = self.step_info = {"retries": 0, "data_time": 0.0}  # fresh: hooks may keep the last one
        (hooks := self._build_hooks()).call("on_before_step", self)
        started = time.perf_counter()
        while True:
            if not self.accumulate_gradients(info):  # max_epochs ended before any micro-batch
                if info["retries"]:
                    self.logger.warning("step %d: no data left to retry non-finite gradients; stopping", self.step + 1)
                self.should_stop = True
                return
            if self.optimizer_step():
                break
            info["retries"] += 1
            if info["retries"] > self.max_non_finite_grad_retries:
                limit = self.max_non_finite_grad_retries
                raise NonFiniteGradientError.at(self.step + 1, self.epoch, info["retries"], limit)
            self.logger.warning("non-finite gradients at step %d; retrying with fresh batches", self.step + 1)
        self.step += 1
        info["step_time"] = time.perf_counter() - started
        hooks.call("on_after_step", self)
        if self._world > 1:
            # A hook may ask one rank to stop (early stopping on its metric, a time limit):
            # a rank that stopped alone would leave the others waiting in the next all-reduce.
            self.should_stop = bool(distributed.agree_max(int(self.should_stop)))

    def accumulate_gradients(self, info: dict[str, Any]) -> bool:
        """The step's micro-steps (next_batch -> forward under autocast -> backward); `loss`,
        `records`, `micro_steps`, `samples` go into `info`. False when no batch was left."""
        n, losses, all_records, samples = self.gradient_accumulation_steps, [], [], 0
        synced = n == 1 or not self.no_sync_accumulate
        for micro_step in range(n):
            self.micro_step = micro_step
            fetch_start = time.perf_counter()
            batch = self.next_batch()
            info["data_time"] += time.perf_counter() - fetch_start
            if batch is END_OF_DATA:
                break
            samples += count_samples(batch)  # from the shape: no device read
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
        if losses and (not synced or len(losses) < n):  # a micro-step gave no loss, or the data ended
            gradients.finish_accumulation(self.model, self.optimized_params, len(losses), n, synced)
        info["loss"] = mean_loss(losses)
        info["records"] = average_records(all_records)
        info["micro_steps"], info["samples"] = len(losses), samples
        return True

    def next_batch(self) -> Any:
        """The next batch on `self.device`, or `END_OF_DATA` when `max_epochs` ends mid-step."""
        return self.data_cursor.next_batch(self.max_epochs)

    def forward(self, batch: Any) -> ForwardOutput:
        """`(loss, records)` of a micro-batch: a scalar (None: no backward) and a dict of numbers
        or 0-d tensors, averaged at log time (keep tensors: `.item()` syncs the host)."""
        if self.forward_fn is None:
            raise NotImplementedError(f"{type(self).__name__}.forward is not implemented: override forward(batch) "
                                      "or pass forward_fn=lambda model, batch: loss")
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
        """Unscale, clip, check, step, zero the gradients, step the scheduler. False (gradients
        discarded) when they are non-finite and the trainer retries; else True."""
        scaler, overflowed = self.active_scaler, False
        if scaler is not None:
            scaler.unscale_(self.optimizer)
            # The one host read of an fp16 step: the scaler's own overflow flag (it reads it
            # again in step()); an overflowing step is skipped, so the schedule waits too.
            overflowed = precision.scaler_found_inf(scaler, self.optimizer)
        grad_norm = self.clip_and_measure_gradients()
        if grad_norm is not None:
            self.step_info["grad_norm"] = grad_norm
        if scaler is None and self.max_non_finite_grad_retries is not None:
            if not gradients.finite_on_all_ranks(math.isfinite(grad_norm), self._grads_agree):  # the host read
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
        """The step's gradients are final (unscaled, clipped, finite; `skipped`: fp16 overflow,
        no update): a strategy may read them here (PhaseTrainer does)."""

    def clip_and_measure_gradients(self) -> torch.Tensor | None:
        """The global gradient norm, clipped to `grad_clip` (None when nobody needs it)."""
        if self.grad_clip is None and (self.max_non_finite_grad_retries is None or self.active_scaler is not None):
            return None  # nobody needs it: fp16 overflow is the scaler's business
        return gradients.clip_and_measure(self.optimized_params, self.grad_clip, self.device)

    @property
    def optimized_params(self) -> list[torch.Tensor]:
        """The parameters the optimizer updates: what is clipped, checked, rescaled."""
        return self._optimized.of(self.optimizer)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context `forward` runs in: use it for a strategy's extra forward passes."""
        return self._autocast_factory()

    # ======================================================================= evaluation

    def eval_forward(self, batch: Any) -> Mapping[str, Any]:
        """One evaluation batch's records (numbers, 0-d tensors; `samples`: its weight): forward's by default."""
        loss, records = check_forward_output(self.forward(batch), type(self).__name__)
        return {"loss": loss, **records} if loss is not None else dict(records)

    def evaluate(self, loaders: Iterable | Mapping[str, Iterable] | None = None,
                 model: nn.Module | None = None) -> dict[str, float]:
        """`{"<split>/<metric>": mean over samples}` of `eval_forward` on every split of `loaders`
        (default `eval_loaders`), under no_grad, autocast and eval mode, over all ranks.
        `model`: score other weights (e.g. `EmaHook.ema_model`; `self.model` is it meanwhile).
        The global RNG is left as it was: evaluating never changes the training."""
        return evaluation.evaluate(self, loaders, model)

    # ======================================================================= state

    def state_dict(self, *, sharded: bool = False) -> dict[str, Any]:
        """Everything needed to continue this run exactly, hooks' state under `"hooks"`. Every
        rank calls it; rank 0 holds the full model (`sharded=True`: each rank its shards)."""
        self.build()
        saved = state.training_state(self.step, self.data_cursor, self._world, *self.model_and_optimizer_state(sharded),
                                     lr_scheduler=self.lr_scheduler, grad_scaler=self.grad_scaler)
        self._build_hooks().call("on_state_dict", self, saved)
        return saved

    def load_state_dict(self, state_dict: Mapping[str, Any], *, sharded: bool = False) -> None:
        """Restore what `state_dict()` returned, onto any number of processes; a state that
        does not fit raises before anything is assigned (`check_state_dict`)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict expects a dict from state_dict(); got {type(state_dict).__name__}")
        self.check_state_dict(state_dict, sharded=sharded)
        options = state.state_dict_options(self.state_dict_options, self.model, sharded)
        model_state, optimizer_state = state_dict["model"], state_dict["optimizer"]
        state.set_model_and_optimizer_state(self.model, self.optimizer, model_state, optimizer_state, options)
        self.step = int(state_dict["step"])
        state.restore_training_state(state_dict, cursor=self.data_cursor, world=self._world,
                                     lr_scheduler=self.lr_scheduler, grad_scaler=self.grad_scaler)
        self._build_hooks().call("on_load_state_dict", self, state_dict)

    def check_state_dict(self, state_dict: Mapping[str, Any], *, sharded: bool = False) -> None:
        """`CheckpointError` unless `state_dict` fits this model and optimizer (names, shapes,
        groups, counters): a resume then falls back to an older checkpoint."""
        self.build()
        strict = getattr(self.state_dict_options, "strict", True)
        state.check_training_state(state_dict, self.unwrapped_model, self.optimizer, sharded=sharded, strict=strict)

    def model_and_optimizer_state(self, sharded: bool = False) -> tuple[dict, dict]:
        """The model's and the optimizer's state dicts, as `state_dict()` holds them (with
        `sharded=True`, this rank's DTensor shards: what DCP saves and loads into)."""
        options = state.state_dict_options(self.state_dict_options, self.model, sharded)
        return state.get_model_and_optimizer_state(self.model, self.optimizer, options)

    # ======================================================================= logging, views

    def log(self, records: Mapping[str, Any], dry_run: bool = False) -> None:
        """Send aggregated metrics to every hook's `on_log` (W&B, metrics.jsonl, ...)."""
        self._build_hooks().call("on_log", self, records, dry_run)

    def log_images(self, records: Mapping[str, Any], dry_run: bool = False) -> None:
        """Send `{name: image}` to every hook's `on_log_images`."""
        self._build_hooks().call("on_log_images", self, records, dry_run)

    epoch = cursor_field("epoch", "The current pass over the data.")
    batch_in_epoch = cursor_field("batch_in_epoch", "Batches drawn from the current epoch.")
    data_loader = cursor_field("loader", "The loader batches come from (`fit(data_loader)` starts a new pass).")

    @property
    def is_built(self) -> bool:
        """Whether `build()` has run (a subclass's `build()` override checks it first)."""
        return self._built

    unwrap = staticmethod(unwrap)  # the plain module under torch.compile / DDP / FSDP1 / AveragedModel

    @property
    def unwrapped_model(self) -> nn.Module:
        """`self.model` without its torch.compile / DDP / FSDP1 wrappers."""
        return unwrap(self.model)


_NULL = contextlib.nullcontext()  # reusable: it holds no state
