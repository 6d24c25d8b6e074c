"""Where and in which precision a run computes: the device, the autocast dtype and the
GradScaler.

Devices: "auto" is cuda (this rank's GPU under torchrun) > mps > cpu; asking for a device
that is not there is an error at construction, not at the first step.

Precision (`mixed_precision`):

- "bf16": autocast to bfloat16, no scaler (bf16 has fp32's exponent range).
- "fp16": autocast to float16 plus a `torch.amp.GradScaler`, on CUDA and on CPU alike.
- "auto": bf16 on CUDA devices that support it, fp16 on older CUDA devices, full precision
  on CPU and MPS (CPU autocast is slower than fp32 on most CPUs without AMX).
- None: full precision.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from .utils import check_choice

__all__ = [
    "PRECISIONS",
    "autocast_factory",
    "grad_scaler_for",
    "default_grad_scaler",
    "enabled_scaler",
    "resolve_device",
    "resolve_precision",
    "scaler_found_inf",
]

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


def autocast_factory(
    device: torch.device, dtype: torch.dtype | None
) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument callable returning the autocast context to wrap `forward` in."""
    if dtype is None:
        return contextlib.nullcontext
    device_type = device.type

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=device_type, dtype=dtype)

    return autocast


def default_grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (None otherwise: bf16 and fp32 gradients need no scaling)."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def grad_scaler_for(
    device: torch.device, dtype: torch.dtype | None, parallel: str | None
) -> torch.amp.GradScaler | None:
    """The GradScaler a run needs: None unless fp16; with FSDP2 a ShardedGradScaler, since
    each rank holds a shard of the gradients and an overflow found on one shard must skip
    the step on every rank (it all-reduces the flag)."""
    if parallel == "fsdp" and dtype == torch.float16:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return default_grad_scaler(device, dtype)


def enabled_scaler(scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    """`scaler` when it will scale (a disabled GradScaler is as good as none), else None."""
    return scaler if scaler is not None and scaler.is_enabled() else None


def scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether `scaler.unscale_(optimizer)` found inf/NaN gradients (one host read)."""
    found = scaler._found_inf_per_device(optimizer)
    return bool(sum(v.item() for v in found.values()))


def resolve_device(device: str | torch.device | int) -> torch.device:
    """"auto" -> cuda (this rank's LOCAL_RANK under torchrun) > mps > cpu. A "cuda"
    without an index is this rank's GPU too. A device that is not available here is a
    ValueError that says what is."""
    resolved = _parse_device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = (
                "built with CUDA, but no GPU is visible" if torch.backends.cuda.is_built() else "a build without CUDA"
            )
            raise ValueError(
                f"device={device!r} asks for CUDA, which is not available here (torch {torch.__version__}: "
                f"{built}); use device='cpu' or 'auto'"
            )
        if resolved.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % count)
        if resolved.index >= count:
            raise ValueError(
                f"device={device!r}: there is no GPU {resolved.index} here ({count} visible: 0..{count - 1})"
            )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"device={device!r} asks for Apple's MPS, which is not available here; use device='cpu' or 'auto'"
        )
    return resolved


def _parse_device(device: str | torch.device | int) -> torch.device:
    if isinstance(device, bool):
        raise TypeError(f"device must be 'auto', a device string, a torch.device or a CUDA index; got {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device index must be >= 0; got {device}")
        return torch.device("cuda", device)
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(
            f"device must be 'auto', a device string, a torch.device or a CUDA index; got {type(device).__name__}"
        )
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")  # this rank's, see resolve_device
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps', ...; got {device!r} ({err})"
        ) from None
