"""The trigger: when a batch's losses are too uniform, how many samples to inject.

The decision reads one number on the host: the previous micro-step's coefficient of
variation, copied to the host asynchronously (`non_blocking`) when it was computed and read
one micro-step later. So the trigger acts on the batch before the current one, and a step
never waits for the GPU to finish just to decide (on the CPU the read is free anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ...utils import check_int, check_number

__all__ = ["LossStdConfig", "LossStdTrigger"]


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
    or every `pulse_every` micro-steps (with gradient accumulation, N per optimizer step),
    and never beyond `budget_frac` x the samples seen: each batch of B adds
    `budget_frac * B` of credit (fractions carried over), and an injection of k spends k.
    k = min(int(B * inject_ratio), max_injected_per_step, credit).
    The cv used is the previous micro-step's (see the module docstring).

    `provider` (see `providers`) supplies the samples; its state, if it has one, is saved
    with the trigger's."""

    def __init__(self, provider: Callable[[Any, torch.Tensor, int], Any],
                 config: LossStdConfig | None = None) -> None:
        if not callable(provider):
            raise TypeError(
                f"LossStdTrigger needs a provider callable (batch, losses, k) -> samples; got {provider!r}"
            )
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
