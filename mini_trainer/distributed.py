"""torch.distributed helpers: who am I, reductions that every backend supports, and
skipping gradient all-reduce on accumulation micro-steps.

Everything here degrades to the single-process answer when no process group is
initialised, so the trainer calls it unconditionally.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "collective_device",
    "all_reduce_sum",
    "all_reduce_mean",
    "union_of_names",
    "agree_max",
    "barrier",
    "gradient_sync",
    "all_reduce_gradients",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def collective_device() -> torch.device:
    """The device tensors must live on for this process group's collectives."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns the input unchanged in a single process)."""
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks. SUM then divide, because ReduceOp.AVG exists only on NCCL."""
    world = get_world_size()
    return all_reduce_sum(tensor) / world if world > 1 else tensor


def agree_max(value: int) -> int:
    """The largest `value` over ranks: every rank takes the same decision (e.g. "a rank got
    SIGTERM: all save and stop") at the same step. MAX works on gloo and NCCL alike."""
    if not is_distributed() or get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier(timeout: float | None = None) -> bool:
    """Wait for every rank; False when `timeout` seconds passed first (the others may be
    gone). A no-op in a single process."""
    if not is_distributed() or get_world_size() == 1:
        return True
    work = dist.barrier(async_op=True)
    if timeout is None:
        work.wait()
        return True
    import datetime

    try:
        return bool(work.wait(timeout=datetime.timedelta(seconds=timeout)))
    except RuntimeError:  # gloo raises on timeout
        return False


def union_of_names(names: list[str]) -> list[str]:
    """Every rank's metric names, in one agreed order, so that reductions line up even
    when a record exists on some ranks only."""
    if not is_distributed():
        return list(names)
    gathered: list[list[str] | None] = [None] * get_world_size()
    dist.all_gather_object(gathered, list(names))
    merged = dict.fromkeys(names)
    for other in gathered:
        merged.update(dict.fromkeys(other or []))
    return list(merged)


def all_reduce_gradients(model: nn.Module, params: list[torch.Tensor]) -> None:
    """Average `params`' gradients over ranks by hand, for an accumulation step whose
    synchronising backward never ran. Every rank must call it at the same step."""
    if not is_distributed() or get_world_size() == 1:
        return
    if hasattr(model, "set_requires_gradient_sync"):
        raise RuntimeError(
            "FSDP2 cannot finish an accumulation step whose last micro-step returned no loss: "
            "return a loss on the last micro-step (e.g. 0 * model-output.sum())"
        )
    if not hasattr(model, "no_sync"):
        return  # not a DDP/FSDP1 wrapper: this model never syncs gradients itself
    grads = [p.grad for p in params if p.grad is not None]
    for grad in grads:
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
    torch._foreach_div_(grads, float(get_world_size()))


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, backward passes all-reduce gradients only when `enabled`.

    DDP and FSDP1 expose `no_sync()`; FSDP2 (`fully_shard`) modules expose
    `set_requires_gradient_sync()` instead, and forgetting it would silently sync on every
    micro-step. Plain modules need nothing.
    """
    if enabled:
        yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):  # DDP, FSDP1
        with model.no_sync():
            yield
    else:
        yield
