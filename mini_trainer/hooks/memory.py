"""CudaMaxMemoryHook: the run's peak memory in `step_info`, where progress and logs show it.

On CUDA the value is `torch.cuda.max_memory_allocated` (a counter kept on the host: reading
it does not wait for the GPU). Elsewhere there is no device allocator to ask, so the hook
reports the process's peak resident set size under a different key, `max_rss`, so that a
CPU figure is never mistaken for a GPU one.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from ..builder import REGISTRY
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

_GIB = float(2**30)


@REGISTRY.register()
class CudaMaxMemoryHook(BaseHook):
    """Add `max_memory` (GiB, peak allocated by PyTorch on the trainer's CUDA device) to
    `trainer.step_info` after every step; on CPU/MPS add `max_rss` (GiB, peak resident
    memory of this process) instead."""

    priority = -10  # before ProgressHook (10) and LoggingHook (0) read step_info

    def on_before_train(self, trainer: BaseTrainer) -> None:
        device = trainer.device
        self.key = "max_memory" if device.type == "cuda" else "max_rss"
        self._device = device

    def on_after_step(self, trainer: BaseTrainer) -> None:
        if self.key == "max_memory":
            trainer.step_info["max_memory"] = torch.cuda.max_memory_allocated(self._device) / _GIB
        else:
            rss = peak_rss_bytes()
            if rss is not None:
                trainer.step_info["max_rss"] = rss / _GIB


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes (None where the OS cannot tell)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
