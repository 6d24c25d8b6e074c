"""Learning-rate schedules as `LambdaLR`s whose factor is a plain object, so their state
dict round-trips (a lambda or closure would be dropped from it)."""

from __future__ import annotations

import math

import torch

from .builder import REGISTRY
from .utils import check_int, check_number


class WarmupCosine:
    """Factor for step t: linear warm-up to 1, then cosine decay to `min_lr_ratio`."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> None:
        check_int("total_steps", total_steps, minimum=1)
        check_int("warmup_steps", warmup_steps, minimum=0)
        check_number("min_lr_ratio", min_lr_ratio)
        if warmup_steps > total_steps:
            raise ValueError(f"warmup_steps must be <= total_steps ({total_steps}); got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {min_lr_ratio!r}")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@REGISTRY.register()
def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for `warmup_steps`, then cosine decay to `min_lr_ratio` x lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_lr_ratio))
