"""Mixed precision: which autocast dtype a device gets, and whether a GradScaler is needed.

- "bf16": autocast to bfloat16, no scaler (bf16 has fp32's exponent range).
- "fp16": autocast to float16 plus a `torch.amp.GradScaler`, on CUDA and on CPU alike.
- "auto": bf16 on CUDA devices that support it, fp16 on older CUDA devices, full precision
  on CPU and MPS (CPU autocast is slower than fp32 on most CPUs without AMX).
- None: full precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager

import torch

from .utils import check_choice

PRECISIONS = ("fp16", "bf16", "auto", None)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(mixed_precision: str | None, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `mixed_precision` on `device` (None: no autocast)."""
    check_choice("mixed_precision", mixed_precision, PRECISIONS)
    if mixed_precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _DTYPES.get(mixed_precision) if mixed_precision else None


def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> Callable[[], ContextManager]:
    """A zero-argument callable returning the autocast context to wrap `forward` in."""
    if dtype is None:
        return contextlib.nullcontext
    device_type = device.type

    def autocast() -> ContextManager:
        return torch.autocast(device_type=device_type, dtype=dtype)

    return autocast


def default_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (None otherwise: bf16 and fp32 gradients need no scaling)."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)
