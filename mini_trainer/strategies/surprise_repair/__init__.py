"""SurpriseRepairTrainer (after SpiralFastLoop): when a batch's per-sample losses are too
uniform, add a few hard or novel samples to it, with a higher weight.

    trainer = SurpriseRepairTrainer(model=m, optimizer=opt, criterion=nn.CrossEntropyLoss(),
                                    trigger=LossStdTrigger(HardestK()), gradient_accumulation_steps=2)
    metrics = trainer.fit(loader, steps=200)

Each micro-step: per-sample losses l (B,) of the batch; the trigger decides how many samples
k to inject; a provider returns k samples shaped like the batch; only those are run through
the model (the batch is not re-forwarded), and the loss is
sum(w l) / sum(w), with w = 1 (or the batch's own sample weights) for the batch and
`weight_alpha` for the injected samples.

The decision reads one number on the host: the previous micro-step's coefficient of
variation, copied to the host asynchronously (`non_blocking`) when it was computed and read
one micro-step later. So the trigger acts on the batch before the current one, and a step
never waits for the GPU to finish just to decide (on the CPU the read is free anyway).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...builder import REGISTRY
from ...trainer import BaseTrainer
from ...utils import check_int, check_number, map_nested_tensor

__all__ = [
    "LossStdConfig",
    "LossStdTrigger",
    "HardestK",
    "ReplayBuffer",
    "GeneratorProvider",
    "SurpriseRepairTrainer",
    "select_samples",
    "concat_samples",
    "check_same_structure",
]


# ---------------------------------------------------------------------------- batch structure


def _leaves(batch: Any, path: str = "batch") -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [(path, batch)]
    if isinstance(batch, Mapping):
        return [leaf for key in batch for leaf in _leaves(batch[key], f"{path}[{key!r}]")]
    if isinstance(batch, (list, tuple)):
        return [leaf for i, item in enumerate(batch) for leaf in _leaves(item, f"{path}[{i}]")]
    return []


def _batch_size(batch: Any) -> int:
    leaves = _leaves(batch)
    if not leaves:
        raise TypeError("a batch must hold at least one tensor (samples along the first dimension)")
    sizes = {t.shape[0] if t.ndim else None for _, t in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"every tensor of a batch must have the samples on dimension 0 with one size; got {sorted(map(str, sizes))}")
    return sizes.pop()


def select_samples(batch: Any, index: torch.Tensor) -> Any:
    """The samples `index` (a device tensor: no host read) of every tensor in `batch`."""
    return map_nested_tensor(lambda t: t.index_select(0, index.to(t.device)), batch)


def concat_samples(first: Any, second: Any) -> Any:
    """`first` and `second` (same structure) joined along the sample dimension."""
    check_same_structure(first, second)
    return _concat(first, second)


def _concat(first: Any, second: Any) -> Any:
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second.to(first.device)])
    if isinstance(first, Mapping):
        return type(first)((k, _concat(v, second[k])) for k, v in first.items())  # by key, not by order
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_concat(a, b) for a, b in zip(first, second)))
    if isinstance(first, (list, tuple)):
        return type(first)(_concat(a, b) for a, b in zip(first, second))
    return first


def check_same_structure(batch: Any, extra: Any, path: str = "batch") -> None:
    """Raise a ValueError/TypeError naming the first place where `extra` is not shaped like
    `batch` (container types, dict keys, lengths, tensor dtypes and per-sample shapes)."""
    if isinstance(batch, torch.Tensor):
        if not isinstance(extra, torch.Tensor):
            raise TypeError(f"injected samples: {path} should be a tensor like the batch's; got {type(extra).__name__}")
        if extra.dtype != batch.dtype or extra.shape[1:] != batch.shape[1:]:
            raise ValueError(
                f"injected samples: {path} has dtype {extra.dtype} and per-sample shape {tuple(extra.shape[1:])}; "
                f"the batch has {batch.dtype} and {tuple(batch.shape[1:])}"
            )
        return
    if isinstance(batch, Mapping):
        if not isinstance(extra, Mapping) or set(extra) != set(batch):
            got = sorted(map(str, extra)) if isinstance(extra, Mapping) else type(extra).__name__
            raise ValueError(f"injected samples: {path} should be a dict with keys {sorted(map(str, batch))}; got {got}")
        for key in batch:
            check_same_structure(batch[key], extra[key], f"{path}[{key!r}]")
        return
    if isinstance(batch, (list, tuple)):
        if not isinstance(extra, (list, tuple)) or len(extra) != len(batch):
            got = f"{type(extra).__name__} of length {len(extra)}" if isinstance(extra, (list, tuple)) else type(extra).__name__
            raise ValueError(f"injected samples: {path} should be a {type(batch).__name__} of length {len(batch)}; got {got}")
        for i, (a, b) in enumerate(zip(batch, extra)):
            check_same_structure(a, b, f"{path}[{i}]")


# ---------------------------------------------------------------------------- providers


def _no_observe(self: Any, batch: Any, losses: torch.Tensor) -> None:
    """Providers that need nothing from the batches they do not inject into."""


class HardestK:
    """The k samples of the current batch with the highest loss (seen twice this step).

    Their losses are already computed: the trainer takes them by index (`indices`) and
    counts them again with weight `weight_alpha`, which equals injecting copies of them,
    with no forward at all. Called as a provider, it returns the copies themselves."""

    def indices(self, losses: torch.Tensor, k: int) -> torch.Tensor:
        return torch.topk(losses.detach(), k).indices

    def __call__(self, batch: Any, losses: torch.Tensor, k: int) -> Any:
        return select_samples(batch, self.indices(losses, k))

    observe = _no_observe


class ReplayBuffer:
    """Keeps up to `capacity` of the highest-loss samples seen (the `keep_per_batch` hardest
    of each batch, on `device`, CPU by default) and injects the k hardest of them. The
    buffer is part of the trainer's state."""

    def __init__(self, capacity: int = 1024, keep_per_batch: int = 4, device: str | torch.device | None = None) -> None:
        check_int("ReplayBuffer.capacity", capacity, minimum=1)
        check_int("ReplayBuffer.keep_per_batch", keep_per_batch, minimum=1)
        self.capacity = capacity
        self.keep_per_batch = keep_per_batch
        self.device = torch.device(device) if device is not None else None  # None: the batches' device (no copies, no sync)
        self.samples: Any = None
        self.losses = torch.empty(0)
        self._last: torch.Tensor | None = None  # indices injected last

    def observe(self, batch: Any, losses: torch.Tensor) -> None:
        keep = min(self.keep_per_batch, losses.shape[0])
        index = torch.topk(losses.detach(), keep).indices
        device = self.device or losses.device
        new = map_nested_tensor(lambda t: t.detach().to(device), select_samples(batch, index))
        new_losses = losses.detach().index_select(0, index).float().to(device)
        if self.samples is None:
            self.samples, self.losses = new, new_losses
        else:
            self.samples = concat_samples(self.samples, new)
            self.losses = torch.cat([self.losses, new_losses])
        if self.losses.shape[0] > self.capacity:  # drop the easiest
            top = torch.topk(self.losses, self.capacity).indices
            self.samples, self.losses = select_samples(self.samples, top), self.losses.index_select(0, top)

    def __call__(self, batch: Any, losses: torch.Tensor, k: int) -> Any:
        if self.samples is None or self.losses.shape[0] == 0:
            return HardestK()(batch, losses, k)  # nothing stored yet
        k = min(k, self.losses.shape[0])
        index = self._last = torch.topk(self.losses, k).indices
        device = _leaves(batch)[0][1].device
        return map_nested_tensor(lambda t: t.to(device, non_blocking=True), select_samples(self.samples, index))

    def update(self, losses: torch.Tensor) -> None:
        """The injected samples' losses now: learnt ones sink and make room for others."""
        if self._last is not None and losses.shape[0] == self._last.shape[0]:
            self.losses = self.losses.index_copy(0, self._last, losses.detach().float().to(self.losses.device))
        self._last = None

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "losses": self.losses}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = self.device or torch.device("cpu")
        self.samples = map_nested_tensor(lambda t: t.to(device), state["samples"]) if state["samples"] is not None else None
        self.losses = state["losses"].to(device)


class GeneratorProvider:
    """Injects what `generate(k, batch)` returns (k new samples shaped like `batch`), e.g.
    Surprisal Sandwich text turned into training sequences."""

    def __init__(self, generate: Callable[[int, Any], Any]) -> None:
        if not callable(generate):
            raise TypeError(f"GeneratorProvider needs a callable generate(k, batch); got {generate!r}")
        self.generate = generate

    def __call__(self, batch: Any, losses: torch.Tensor, k: int) -> Any:
        return self.generate(k, batch)

    observe = _no_observe


# ---------------------------------------------------------------------------- trigger


@dataclass
class LossStdConfig:
    """When and how much to inject (defaults from SpiralFastLoop)."""

    std_threshold: float = 0.15
    inject_ratio: float = 0.08
    weight_alpha: float = 1.2
    budget_frac: float = 0.03
    pulse_every: int = 800
    max_injected_per_step: int = 128

    def __post_init__(self) -> None:
        check_number("LossStdConfig.std_threshold", self.std_threshold)
        check_number("LossStdConfig.inject_ratio", self.inject_ratio)
        check_number("LossStdConfig.weight_alpha", self.weight_alpha, positive=True)
        check_number("LossStdConfig.budget_frac", self.budget_frac)
        check_int("LossStdConfig.pulse_every", self.pulse_every, minimum=1)
        check_int("LossStdConfig.max_injected_per_step", self.max_injected_per_step, minimum=0)
        for name in ("inject_ratio", "budget_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"LossStdConfig.{name} must be in [0, 1]; got {getattr(self, name)!r}")


class LossStdTrigger:
    """Fire when cv = std(l) / (|mean(l)| + 1e-8) <= `std_threshold` (losses too uniform),
    or every `pulse_every` micro-steps (with gradient accumulation, N per optimizer step), and never beyond `budget_frac` x the samples seen:
    each batch of B adds `budget_frac * B` of credit (fractions carried over), and an
    injection of k spends k. k = min(int(B * inject_ratio), max_injected_per_step, credit).
    The cv used is the previous micro-step's (see the module docstring)."""

    def __init__(self, provider: Callable[[Any, torch.Tensor, int], Any], config: LossStdConfig | None = None) -> None:
        if not callable(provider):
            raise TypeError(f"LossStdTrigger needs a provider callable (batch, losses, k) -> samples; got {provider!r}")
        self.provider = provider
        self.config = config or LossStdConfig()
        if not isinstance(self.config, LossStdConfig):
            raise TypeError(f"config must be a LossStdConfig; got {type(self.config).__name__}")
        self.calls = 0  # micro-steps seen
        self.seen = 0  # samples seen
        self.credit = 0.0
        self.fired = 0
        self.injected = 0
        self._pending_cv: torch.Tensor | None = None  # last micro-step's cv, on its way to the host
        self._pending_ready: Any = None  # its CUDA event
        self.last_cv = float("nan")

    def cv(self, losses: torch.Tensor) -> torch.Tensor:
        std, mean = torch.std_mean(losses.detach().float(), correction=0)
        return std / (mean.abs() + 1e-8)

    def decide(self, losses: torch.Tensor) -> int:
        """How many samples to inject into this micro-step (0: none)."""
        cfg = self.config
        batch = int(losses.shape[0])
        self.calls += 1
        self.seen += batch
        self.credit += cfg.budget_frac * batch
        previous, previous_ready = self._pending_cv, self._pending_ready
        self._pending_cv = self.cv(losses).to("cpu", non_blocking=True)
        self._pending_ready = None
        if losses.is_cuda:
            self._pending_ready = torch.cuda.Event()
            self._pending_ready.record()
        if previous is not None:
            if previous_ready is not None:
                previous_ready.synchronize()  # long done: it was queued a micro-step ago
            self.last_cv = float(previous)
        uniform = previous is not None and self.last_cv <= cfg.std_threshold
        pulse = self.calls % cfg.pulse_every == 0
        if not (uniform or pulse):
            return 0
        k = min(int(batch * cfg.inject_ratio + 1e-9), cfg.max_injected_per_step, int(self.credit + 1e-9))
        if k <= 0:
            return 0
        self.credit -= k
        self.fired += 1
        self.injected += k
        return k

    def refund(self, unused: int) -> None:
        """A provider returned `unused` fewer samples than decided: they were not spent."""
        self.credit += unused
        self.injected -= unused

    def state_dict(self) -> dict[str, Any]:
        if self._pending_ready is not None:
            self._pending_ready.synchronize()  # the copy must have landed before it is saved
        state: dict[str, Any] = {
            "calls": self.calls, "seen": self.seen, "credit": self.credit, "fired": self.fired,
            "injected": self.injected, "last_cv": self.last_cv,
            "pending_cv": self._pending_cv.clone() if self._pending_cv is not None else None,
        }
        if callable(getattr(self.provider, "state_dict", None)):
            state["provider"] = self.provider.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.calls, self.seen = int(state["calls"]), int(state["seen"])
        self.credit, self.fired, self.injected = float(state["credit"]), int(state["fired"]), int(state["injected"])
        self.last_cv = float(state["last_cv"])
        self._pending_cv = state["pending_cv"].clone() if state.get("pending_cv") is not None else None
        if state.get("provider") is not None and callable(getattr(self.provider, "load_state_dict", None)):
            self.provider.load_state_dict(state["provider"])


# ---------------------------------------------------------------------------- trainer


@REGISTRY.register()
class SurpriseRepairTrainer(BaseTrainer):
    """BaseTrainer with per-sample losses and loss-uniformity-triggered injection.

    Args:
        criterion: a loss module or function; called with `reduction="none"` semantics:
            `criterion(model(inputs), targets)` must return one loss per sample (extra
            dimensions, e.g. tokens, are averaged). Modules with a `reduction` attribute are
            switched to "none". Or override `per_sample_loss(batch)`.
        trigger: a `LossStdTrigger` (None: never inject; the trainer is then BaseTrainer
            with per-sample losses).
        reforward_all: run the whole batch again together with the injected samples (the
            reference implementation's cost; for comparison only).
        **kwargs: BaseTrainer keywords.

    Batches are `(inputs, targets)` or `(inputs, targets, sample_weights)` for the default
    `per_sample_loss`; any structure for your own. Injected samples that carry a sample
    weight of their own get `weight_alpha` times it. Each step reports `records["repair"]`:
    `fired` (0/1, its mean is the firing rate), `injected` (samples) and `cv`.
    BatchNorm caveat: the injected samples go through the model in a batch of their own,
    so BatchNorm statistics see them apart from the batch (as extra small batches).
    """

    def __init__(self, *, criterion: Callable[..., torch.Tensor] | None = None, trigger: LossStdTrigger | None = None,
                 reforward_all: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if trigger is not None and not isinstance(trigger, LossStdTrigger):
            raise TypeError(f"trigger must be a LossStdTrigger or None; got {type(trigger).__name__}")
        if criterion is not None and not callable(criterion):
            raise TypeError(f"criterion must be callable (outputs, targets) -> per-sample losses; got {criterion!r}")
        if isinstance(criterion, nn.Module) and hasattr(criterion, "reduction"):
            criterion = copy.copy(criterion)  # the user's module keeps its own reduction
            criterion.reduction = "none"
        self.criterion = criterion
        self.trigger = trigger
        self.reforward_all = bool(reforward_all)
        observe = getattr(trigger.provider, "observe", None) if trigger is not None else None
        # Providers that learn from every batch (a replay buffer) see it; the others cost nothing.
        self._observes = callable(observe) and type(trigger.provider).observe is not _no_observe

    max_processes_reason = (
        "on several processes it supports providers that pick from the batch (HardestK) only: a provider "
        "of new samples adds forward passes that would differ between ranks under DDP"
    )

    @property
    def max_processes(self) -> int | None:  # type: ignore[override]
        picks_from_batch = self.trigger is None or callable(getattr(self.trigger.provider, "indices", None))
        return None if picks_from_batch else 1

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        """One loss per sample, shape (B,). Default: `criterion(model(batch[0]), batch[1])`."""
        if self.criterion is None:
            raise NotImplementedError("SurpriseRepairTrainer needs criterion= or an override of per_sample_loss(batch)")
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise TypeError("the default per_sample_loss needs batches (inputs, targets[, sample_weights]); override per_sample_loss for others")
        losses = self.criterion(self.model(batch[0]), batch[1])
        return losses.reshape(losses.shape[0], -1).mean(1) if losses.ndim > 1 else losses

    def sample_weights(self, batch: Any) -> torch.Tensor | None:
        """The batch's own sample weights: the third item of a tuple batch, if any."""
        if isinstance(batch, (list, tuple)) and len(batch) >= 3 and isinstance(batch[2], torch.Tensor):
            weights, size = batch[2], _batch_size(batch)
            if weights.shape != (size,):
                raise ValueError(
                    f"sample weights (the batch's third item) must have shape ({size},), one per sample; got "
                    f"{tuple(weights.shape)} (override sample_weights() for another layout)"
                )
            return weights.float()
        return None

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        losses = self.per_sample_loss(batch)
        if losses.ndim != 1:
            raise ValueError(f"per_sample_loss must return one loss per sample, shape (B,); got {tuple(losses.shape)}")
        given = self.sample_weights(batch)
        k = self.trigger.decide(losses) if self.trigger is not None else 0
        if k == 0 and given is None:
            loss = losses.mean()  # the common case, in one op: sum(1 * l) / sum(1)
        else:
            weights = torch.ones_like(losses, dtype=torch.float32) if given is None else given.to(losses.device)
            total, norm = (weights * losses.float()).sum(), weights.sum()
        from_batch = getattr(self.trigger.provider, "indices", None) if self.trigger is not None else None
        if k and callable(from_batch) and not self.reforward_all:
            # Samples of this very batch: their losses (and graph) exist already.
            index = from_batch(losses, k)
            extra_w = self.trigger.config.weight_alpha * weights.index_select(0, index)
            total = total + (extra_w * losses.float().index_select(0, index)).sum()
            norm = norm + extra_w.sum()
        elif k:
            extra = self.trigger.provider(batch, losses, k)
            check_same_structure(batch, extra)
            got = _batch_size(extra)
            if got < k:
                self.trigger.refund(k - got)
                k = got
            own = self.sample_weights(extra)
            own = own.to(losses.device) if own is not None else torch.ones(_batch_size(extra), device=losses.device)
            extra_w = self.trigger.config.weight_alpha * own
            if self.reforward_all:
                # The reference: everything through the model again, originals and extras.
                joined = self.per_sample_loss(concat_samples(batch, extra))
                joined_w = torch.cat([weights, extra_w])
                total, norm = (joined_w * joined.float()).sum(), joined_w.sum()
            else:
                extra_losses = self.per_sample_loss(extra)
                total = total + (extra_w * extra_losses.float()).sum()
                norm = norm + extra_w.sum()
                if callable(getattr(self.trigger.provider, "update", None)):
                    self.trigger.provider.update(extra_losses)
        if k or given is not None:
            loss = total / norm
        if self._observes:
            self.trigger.provider.observe(batch, losses)
        records = {"repair": {"fired": float(k > 0), "injected": float(k), "cv": self.trigger.last_cv if self.trigger else float("nan")}}
        return loss, records

    def state_dict(self, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(**kwargs)
        state["surprise_repair"] = self.trigger.state_dict() if self.trigger is not None else None
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], **kwargs: Any) -> None:
        super().load_state_dict(state_dict, **kwargs)
        if self.trigger is not None and state_dict.get("surprise_repair") is not None:
            self.trigger.load_state_dict(state_dict["surprise_repair"])
