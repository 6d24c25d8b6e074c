"""SpiralFastLoop's documented API on top of mini_trainer: code written for it runs after
changing only its imports to `from mini_trainer.compat.spiralfastloop import ...`
(`spiralfastloop`, `spiralfastloop.utils` and `spiralfastloop.extras.trigger_mix` are all
this one module).

    loader = dataloader_from_dataset(TensorDataset(X, y), batch_size=256, device="auto")
    trainer = FastTrainer(model, opt, grad_accum=2, log_interval=50)
    metrics = trainer.train_one_epoch(loader, nn.CrossEntropyLoss(), steps=200)

What maps to what:

- `FastTrainer` is a `BaseTrainer` (through `SurpriseRepairTrainer`), so hooks, checkpoints,
  exact resume and torchrun work with it. `grad_accum` is `gradient_accumulation_steps`,
  `trigger_hook` is `trigger`, `amp` is `mixed_precision`, `log_interval` a `ProgressHook`;
  any other `BaseTrainer` keyword passes through.
- `train_one_epoch(loader, criterion, steps)` is `fit(loader, epochs=1, steps=steps)`:
  `steps` counts optimizer steps (each `grad_accum` batches), and the epoch's end stops it
  earlier. It returns fit's averaged metrics (`loss`, ...) plus the trigger's counters.
- `LossStdTrigger` / `LossStdConfig` are `mini_trainer.strategies.surprise_repair`'s, with
  SpiralFastLoop's provider signature `provider(k, device, ctx) -> (inputs, targets[,
  weights])` accepted next to our own providers (`HardestK`, `ReplayBuffer`, ...).
- `dataloader_from_dataset` is `mini_trainer.data.stateful_loader` (exact resume) with
  `pin_memory` and workers chosen for the device.

What differs: injected samples go through the model on their own (the batch is not
re-forwarded; `reforward_all=True` does, as SpiralFastLoop did); `amp="auto"` runs full
precision on CPU and MPS (bf16 on CUDA where supported, else fp16 with a GradScaler);
`compile="auto"` compiles on CUDA only (compiling takes longer than a short CPU run saves);
BaseTrainer's non-finite-gradient check stays on (one host read per step; pass
`max_non_finite_grad_retries=None` to drop it); under torchrun a trigger needs a provider
that picks from the batch (`HardestK`): SpiralFastLoop-style providers run on one process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..data import stateful_loader
from ..hooks import ProgressHook
from ..precision import resolve_device
from ..strategies.surprise_repair import GeneratorProvider, HardestK, LossStdConfig, ReplayBuffer, SurpriseRepairTrainer
from ..strategies.surprise_repair import LossStdTrigger as _SurpriseRepairTrigger
from ..strategies.surprise_repair.batches import batch_size
from ..utils import check_int

__all__ = [
    "FastTrainer",
    "dataloader_from_dataset",
    "LossStdTrigger",
    "LossStdConfig",
    "SeedProvider",
    "HardestK",
    "ReplayBuffer",
    "GeneratorProvider",
]


#: FastTrainer's `amp` -> BaseTrainer's `mixed_precision`.
AMP_CHOICES: dict[Any, str | None] = {
    "auto": "auto", True: "auto", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
    None: None, False: None, "off": None, "none": None, "fp32": None,
}

NEEDS_PER_SAMPLE = (
    "with a trigger_hook the criterion needs reduction='none' (one loss per sample, e.g. "
    "nn.CrossEntropyLoss(reduction='none')); FastTrainer averages them for the loss"
)


# ============================================================================ data


def dataloader_from_dataset(dataset: Any, batch_size: int, device: str | torch.device | int = "auto",
                            shuffle: bool = True, num_workers: int | None = None, pin_memory: bool | None = None,
                            *, seed: int = 0, drop_last: bool = False, **kwargs: Any) -> Any:
    """A loader over `dataset` set up for `device`: on CUDA pinned memory (so the trainer's
    non_blocking copies overlap) and a few workers (up to 4, leaving one core to the main
    process), with persistent workers; on CPU and MPS no pinning and no workers (the copy is
    free or not pinnable, and worker processes cost more than indexing tensors in memory).
    `num_workers` / `pin_memory` override the choice; other keywords go to the loader.

    It is a `mini_trainer.data.stateful_loader` (a torchdata `StatefulDataLoader` whose
    order depends on `(seed, epoch)` only), so a checkpointed run resumes mid-epoch exactly,
    and under torchrun each rank reads its own share."""
    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0, allow_none=True)
    cuda = resolve_device(device).type == "cuda"
    if num_workers is None:
        num_workers = min(4, max(1, (os.cpu_count() or 2) - 1)) if cuda else 0
    if pin_memory is None:
        pin_memory = cuda
    if num_workers > 0:
        kwargs.setdefault("persistent_workers", True)
    return stateful_loader(dataset, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                           num_workers=num_workers, pin_memory=bool(pin_memory), **kwargs)


# ============================================================================ the trigger


def kind(value: Any) -> str:
    """`value`'s type, with its length for lists and tuples (for error messages)."""
    return f"{type(value).__name__} of length {len(value)}" if isinstance(value, (list, tuple)) else \
        type(value).__name__


class SeedProvider:
    """A SpiralFastLoop provider `fn(k, device, ctx) -> (inputs, targets)` or `(inputs,
    targets, weights)` as one of ours (`(batch, losses, k) -> samples`).

    `ctx` holds `loss_vec` (the batch's per-sample losses, detached), `inputs`, `targets`,
    `weights` (the batch's third item or None), `batch` and `k`. The samples returned must
    be shaped like the batch's (nested structures included). `weights`, a 1-D tensor, is
    either one weight per injected sample (multiplied by `weight_alpha`, as for our
    providers) or, as SpiralFastLoop documents, one per sample of the concatenated batch
    (originals then injected; used as given, so its originals' part must equal the batch's
    own weights: ones, or its third item). Either way it must sum to a positive value."""

    def __init__(self, fn: Callable[[int, torch.device, dict[str, Any]], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"provider must be callable (k, device, ctx) -> (inputs, targets); got {fn!r}")
        self.fn = fn
        self.last_samples: Any = None  # what the last call returned, and its weights
        self.last_weights: torch.Tensor | None = None
        self.weights_are_final = False  # True: given for the concatenated batch, no weight_alpha

    def __call__(self, batch: Any, losses: torch.Tensor, k: int) -> Any:
        if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
            raise TypeError(f"a SpiralFastLoop provider needs (inputs, targets[, weights]) batches; got {kind(batch)}")
        own = batch[2] if len(batch) == 3 else None
        ctx = {"loss_vec": losses.detach(), "inputs": batch[0], "targets": batch[1], "weights": own,
               "batch": batch, "k": k}
        out = self.fn(k, losses.device, ctx)
        if not isinstance(out, (list, tuple)) or len(out) not in (2, 3):
            raise TypeError(f"the trigger's provider must return (inputs, targets) or (inputs, targets, weights); "
                            f"got {kind(out)}")
        container = list if isinstance(batch, list) else tuple  # check_same_structure takes either
        samples = container(out[:2])
        weights = self._check_weights(out[2], batch, batch_size(samples)) if len(out) == 3 else None
        if own is not None:  # mirror the batch: its third item is the injected samples' own weights
            ones = torch.ones(batch_size(samples), dtype=own.dtype, device=own.device)
            samples = container([*samples, weights.to(own.dtype) if weights is not None else ones])
        self.last_samples, self.last_weights = samples, weights
        return samples

    def _check_weights(self, weights: Any, batch: Any, injected: int) -> torch.Tensor:
        size = batch_size(batch)
        if not isinstance(weights, torch.Tensor) or weights.ndim != 1 or weights.shape[0] not in (injected,
                                                                                                   size + injected):
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"the provider's sample weights must be a 1-D tensor of {injected} (the injected "
                             f"samples) or {size + injected} (the concatenated batch) values; got {shape}")
        if float(weights.sum()) <= 0:  # one host read, only when a provider returns weights
            raise ValueError("the provider's sample weights must sum to a positive value")
        self.weights_are_final = weights.shape[0] == size + injected
        if not self.weights_are_final:
            return weights
        own = batch[2] if len(batch) == 3 else torch.ones(size, device=weights.device)
        if not torch.equal(weights[:size].float(), own.to(weights.device).float()):
            raise ValueError("the provider's weights for the concatenated batch must repeat the batch's own weights "
                             "(ones, or the batch's third item) for its original samples; give the batch's "
                             "weights in the batch instead")
        return weights[size:]


def is_own_provider(provider: Any) -> bool:
    """Whether `provider` is one of ours `(batch, losses, k)` rather than SpiralFastLoop's."""
    if isinstance(provider, (HardestK, ReplayBuffer, GeneratorProvider, SeedProvider)):
        return True
    return any(callable(getattr(provider, name, None)) for name in ("indices", "observe", "update"))


class LossStdTrigger(_SurpriseRepairTrigger):
    """`mini_trainer.strategies.surprise_repair.LossStdTrigger` (the same rule, counters and
    checkpointed state) that also takes SpiralFastLoop's providers: a provider that is one of
    ours (`HardestK`, `ReplayBuffer`, `GeneratorProvider`, or any object with an `indices`,
    `observe` or `update` method) is used as it is; any other callable is called as
    `provider(k, device, ctx)` (see `SeedProvider`)."""

    def __init__(self, provider: Any, config: LossStdConfig | None = None) -> None:
        if not callable(provider):
            raise TypeError(f"LossStdTrigger needs a provider callable (k, device, ctx) -> (inputs, targets); "
                            f"got {provider!r}")
        super().__init__(provider if is_own_provider(provider) else SeedProvider(provider), config)


# ============================================================================ the trainer


def check_criterion(criterion: Any, per_sample: bool) -> Any:
    """`criterion` if it fits: callable, and with `reduction='none'` when a trigger needs it."""
    if not callable(criterion):
        raise TypeError(f"criterion must be callable (outputs, targets) -> loss; got {criterion!r}")
    reduction = getattr(criterion, "reduction", None)
    if per_sample and isinstance(reduction, str) and reduction != "none":
        raise ValueError(f"criterion has reduction={reduction!r}: {NEEDS_PER_SAMPLE}")
    return criterion


def check_batch(batch: Any) -> None:
    if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
        raise TypeError(f"FastTrainer needs (inputs, targets) or (inputs, targets, sample_weights) batches; got "
                        f"{kind(batch)}"
                        " (subclass it and override forward(batch) for others)")


class FastTrainer(SurpriseRepairTrainer):
    """SpiralFastLoop's FastTrainer as a BaseTrainer.

    Args:
        model, optimizer: ready objects (the model is moved to the device).
        grad_accum: batches per optimizer step (`gradient_accumulation_steps`), >= 1.
        log_interval: a progress line every this many optimizer steps (a `ProgressHook`,
            unless `hooks` holds one already); None: no progress output.
        trigger_hook: a `LossStdTrigger` (ours or this module's); the criterion must then
            give one loss per sample (`reduction='none'`).
        device: "auto" (CUDA > MPS > CPU), or any device BaseTrainer takes.
        amp: "auto" (bf16 on CUDA where supported, else fp16 with a GradScaler; full
            precision on CPU and MPS), "bf16", "fp16", or None/False (full precision).
        compile: "auto" (compile on CUDA only), True, False, or a dict of `torch.compile`
            keywords. Best effort: if compiling fails, now or at the first forward, a
            RuntimeWarning says why and the model runs eagerly.
        criterion: the loss, if `train()` / `fit()` are used instead of `train_one_epoch`.
        **kwargs: BaseTrainer keywords (`hooks`, `workspace`, `grad_clip`, `seed`, `max_steps`,
            ...) and `reforward_all` (SurpriseRepairTrainer's).

    Batches are `(inputs, targets)` or `(inputs, targets, sample_weights)`; the loss is
    `criterion(model(inputs), targets)`, averaged (sample-weighted when weights are given)
    when the criterion returns one loss per sample.
    """
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_accum: int = 1,
                 log_interval: int | None = 50, trigger_hook: _SurpriseRepairTrigger | None = None,
                 device: str | torch.device | int = "auto", amp: str | bool | None = "auto",
                 compile: bool | str | Mapping[str, Any] = "auto", *, criterion: Any = None, **kwargs: Any) -> None:
        check_int("grad_accum", grad_accum, minimum=1)
        check_int("log_interval", log_interval, minimum=1, allow_none=True)
        if trigger_hook is not None and not isinstance(trigger_hook, _SurpriseRepairTrigger):
            raise TypeError(f"trigger_hook must be a LossStdTrigger or None; got {type(trigger_hook).__name__}")
        if isinstance(amp, bool) or amp is None or isinstance(amp, str):
            mixed_precision = AMP_CHOICES.get(amp.lower() if isinstance(amp, str) else amp, "invalid")
        else:
            mixed_precision = "invalid"
        if mixed_precision == "invalid":
            raise ValueError(f"amp must be 'auto', 'bf16', 'fp16', True, False or None; got {amp!r}")
        if not (isinstance(compile, (bool, Mapping)) or compile == "auto"):
            raise ValueError(
                f"compile must be 'auto', True, False or a dict of torch.compile keywords; got {compile!r}"
            )
        renamed = {"gradient_accumulation_steps": "grad_accum", "trigger": "trigger_hook",
                   "mixed_precision": "amp"}
        for name in set(renamed) & set(kwargs):
            raise TypeError(f"FastTrainer takes {renamed[name]}= instead of {name}=")
        super().__init__(model=model, optimizer=optimizer, gradient_accumulation_steps=grad_accum, device=device,
                         mixed_precision=mixed_precision, trigger=trigger_hook, compile=False, **kwargs)
        self.log_interval = log_interval
        self.compile_request = compile
        self.eager_model: nn.Module | None = None  # the model before torch.compile, while compiled
        self.trigger_baseline = (0, 0, 0)  # the trigger's counters when train_one_epoch began
        self.criterion = check_criterion(criterion, trigger_hook is not None) if criterion is not None else None

    def build_hooks(self) -> list:
        hooks = super().build_hooks()
        if self.log_interval is not None and not any(isinstance(h, ProgressHook) for h in hooks):
            hooks.append(ProgressHook(interval=self.log_interval))
        return hooks

    def build(self) -> None:
        if self.is_built:
            return
        super().build()
        request = self.compile_request
        if request == "auto":
            request = self.device.type == "cuda"
        if not request:
            return
        try:
            compiled = torch.compile(self.model, **(dict(request) if isinstance(request, Mapping) else {}))
        except Exception as err:  # noqa: BLE001 - best effort: any failure means eager
            self.warn_eager(err)
            return
        self.eager_model, self.model = self.model, compiled

    def warn_eager(self, err: BaseException) -> None:
        reason = " ".join(str(err).split())[:200]  # one line
        message = f"torch.compile failed ({type(err).__name__}: {reason}); running eagerly"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        self.logger.warning(message)

    def call_model(self, inputs: Any) -> Any:
        """`self.model(inputs)`; a compiled model that fails falls back to the eager one for good."""
        if self.eager_model is None:
            return self.model(inputs)
        try:
            return self.model(inputs)
        except Exception as err:  # noqa: BLE001 - a real error in the model raises again eagerly
            self.model, self.eager_model = self.eager_model, None
            self.warn_eager(err)
            return self.model(inputs)

    def criterion_output(self, batch: Any) -> torch.Tensor:
        if self.criterion is None:
            raise RuntimeError("FastTrainer has no criterion: call train_one_epoch(loader, criterion) "
                               "or pass criterion= to the constructor")
        check_batch(batch)
        return self.criterion(self.call_model(batch[0]), batch[1])

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        """One loss per sample, (B,): the criterion's, extra dimensions (tokens) averaged."""
        losses = self.criterion_output(batch)
        if losses.ndim == 0:
            raise ValueError(f"the criterion returned one loss for the whole batch: {NEEDS_PER_SAMPLE}")
        return losses.reshape(losses.shape[0], -1).mean(1) if losses.ndim > 1 else losses

    def sample_weights(self, batch: Any) -> torch.Tensor | None:
        provider = self.trigger.provider if self.trigger is not None else None
        if isinstance(provider, SeedProvider) and batch is provider.last_samples and provider.last_weights is not None:
            weights = provider.last_weights.float()  # the provider's, for the injected samples
            # Given for the concatenated batch they are final: undo the weight_alpha the trainer applies.
            return weights / self.trigger.config.weight_alpha if provider.weights_are_final else weights
        return super().sample_weights(batch)

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.trigger is not None:
            return super().forward(batch)  # SurpriseRepairTrainer: per-sample losses, injection
        out = self.criterion_output(batch)
        weights = self.sample_weights(batch)
        if out.ndim == 0:
            if weights is not None:
                raise ValueError("batches with sample weights need per-sample losses: use a criterion with "
                                 "reduction='none'")
            return out, {}
        losses = out.reshape(out.shape[0], -1).mean(1) if out.ndim > 1 else out
        if weights is None:
            return losses.mean(), {}
        weights = weights.to(losses.device)
        return (weights * losses.float()).sum() / weights.sum(), {}

    def train_one_epoch(self, loader: Iterable, criterion: Any, steps: int | None = None) -> dict[str, Any]:
        """Train one pass over `loader` (a pass already started counts as it), or `steps`
        optimizer steps if that ends first, with `criterion(model(inputs), targets)`.

        Returns the metrics averaged over the steps (`fit()`'s: `loss`, `grad_norm`, `lr`,
        `samples_per_s`, ..., `step`, `epoch`), and with a trigger its counters for this
        call: `trigger_fired` (times it fired), `trigger_injected` (samples injected) and
        `trigger_seen` (samples it saw), plus `repair` (per step: the firing rate, mean
        samples injected, mean cv)."""
        check_int("steps", steps, minimum=1, allow_none=True)
        self.criterion = check_criterion(criterion, self.trigger is not None)
        self.trigger_baseline = self.trigger_counters()
        metrics = self.fit(loader, epochs=1, steps=steps)
        if self.trigger is not None:
            now = self.trigger_counters()
            for name, value, before in zip(("fired", "injected", "seen"), now, self.trigger_baseline, strict=True):
                metrics[f"trigger_{name}"] = value - before
        return metrics

    def trigger_counters(self) -> tuple[int, int, int]:
        """The trigger's `fired`, `injected`, `seen` so far (zeros without one)."""
        trigger = self.trigger
        return (trigger.fired, trigger.injected, trigger.seen) if trigger is not None else (0, 0, 0)

    def load_state_dict(self, state_dict: Mapping[str, Any], **kwargs: Any) -> None:
        super().load_state_dict(state_dict, **kwargs)
        self.trigger_baseline = self.trigger_counters()  # a resume inside train_one_epoch: count from here
