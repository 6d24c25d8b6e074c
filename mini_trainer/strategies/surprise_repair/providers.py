"""Providers: where the samples a LossStdTrigger injects come from.

A provider is a callable `(batch, losses, k) -> samples` returning up to k samples shaped
like `batch`. Optional members the trainer uses when present:

- `indices(losses, k)`: the samples are the batch's own; their losses (and graph) exist
  already, so the trainer reweights them instead of running a forward (HardestK);
- `observe(batch, losses)`: sees every batch, also those it does not inject into;
- `update(losses)`: the injected samples' losses after the forward;
- `state_dict()` / `load_state_dict(state)`: saved with the trainer's checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ...utils import check_int, map_nested_tensor, to_device
from .batches import batch_tensors, concat_samples, select_samples

__all__ = ["HardestK", "ReplayBuffer", "GeneratorProvider"]


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

    def __init__(self, capacity: int = 1024, keep_per_batch: int = 4,
                 device: str | torch.device | None = None) -> None:
        check_int("ReplayBuffer.capacity", capacity, minimum=1)
        check_int("ReplayBuffer.keep_per_batch", keep_per_batch, minimum=1)
        self.capacity = capacity
        self.keep_per_batch = keep_per_batch
        # None: the batches' device (no copies, no sync)
        self.device = torch.device(device) if device is not None else None
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
        device = batch_tensors(batch)[0].device
        return to_device(select_samples(self.samples, index), device)

    def update(self, losses: torch.Tensor) -> None:
        """The injected samples' losses now: learnt ones sink and make room for others."""
        if self._last is not None and losses.shape[0] == self._last.shape[0]:
            self.losses = self.losses.index_copy(0, self._last, losses.detach().float().to(self.losses.device))
        self._last = None

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "losses": self.losses}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = self.device or torch.device("cpu")
        samples = state["samples"]
        self.samples = map_nested_tensor(lambda t: t.to(device), samples) if samples is not None else None
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
