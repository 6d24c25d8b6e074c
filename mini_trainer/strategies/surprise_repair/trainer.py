"""SurpriseRepairTrainer: BaseTrainer with per-sample losses, and a LossStdTrigger that adds
a few hard or novel samples, with a higher weight, to batches whose losses are too uniform.

Each micro-step: per-sample losses l (B,) of the batch; the trigger decides how many samples
k to inject; a provider returns k samples shaped like the batch; only those are run through
the model (the batch is not re-forwarded), and the loss is sum(w l) / sum(w), with w = 1 (or
the batch's own sample weights) for the batch and `weight_alpha` for the injected samples.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ...builder import REGISTRY
from ...trainer import BaseTrainer
from .batches import batch_size, check_same_structure, concat_samples
from .providers import _no_observe
from .trigger import LossStdTrigger

__all__ = ["SurpriseRepairTrainer"]


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

    def __init__(self, *, criterion: Callable[..., torch.Tensor] | None = None,
                 trigger: LossStdTrigger | None = None, reforward_all: bool = False, **kwargs: Any) -> None:
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
            raise TypeError(
                "the default per_sample_loss needs batches (inputs, targets[, sample_weights]); "
                "override per_sample_loss for others"
            )
        losses = self.criterion(self.model(batch[0]), batch[1])
        return losses.reshape(losses.shape[0], -1).mean(1) if losses.ndim > 1 else losses

    def sample_weights(self, batch: Any) -> torch.Tensor | None:
        """The batch's own sample weights: the third item of a tuple batch, if any."""
        if isinstance(batch, (list, tuple)) and len(batch) >= 3 and isinstance(batch[2], torch.Tensor):
            weights, size = batch[2], batch_size(batch)
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
            got = batch_size(extra)
            if got < k:
                self.trigger.refund(k - got)
                k = got
            own = self.sample_weights(extra)
            own = own.to(losses.device) if own is not None else torch.ones(batch_size(extra), device=losses.device)
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
        cv = self.trigger.last_cv if self.trigger else float("nan")
        records = {"repair": {"fired": float(k > 0), "injected": float(k), "cv": cv}}
        return loss, records

    def state_dict(self, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(**kwargs)
        state["surprise_repair"] = self.trigger.state_dict() if self.trigger is not None else None
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], **kwargs: Any) -> None:
        super().load_state_dict(state_dict, **kwargs)
        if self.trigger is not None and state_dict.get("surprise_repair") is not None:
            self.trigger.load_state_dict(state_dict["surprise_repair"])
