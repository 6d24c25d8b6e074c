"""Gradient mechanics of one optimizer step: which parameters are optimized, finishing an
accumulation that skipped micro-steps, the global norm (and clipping), and the error for
gradients that stay non-finite."""

from __future__ import annotations

import torch
from torch import nn

from . import distributed

__all__ = ["NonFiniteGradientError", "OptimizedParams", "clip_and_measure", "finish_accumulation",
           "finite_on_all_ranks"]


class NonFiniteGradientError(RuntimeError):
    """Gradients stayed NaN/inf after `max_non_finite_grad_retries` fresh attempts."""

    @classmethod
    def at(cls, step: int, epoch: int, attempts: int, limit: int | None) -> NonFiniteGradientError:
        return cls(
            f"non-finite gradients at step {step} (epoch {epoch}): {attempts} attempt(s) in a row, "
            f"max_non_finite_grad_retries={limit}; check the learning rate, the data and the loss, "
            "or raise the limit"
        )


class OptimizedParams:
    """The parameters `optimizer` updates, as one list, re-read only when its param groups
    change (`add_param_group` to unfreeze layers): what is clipped, checked, rescaled."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._params: list[torch.Tensor] = []

    def of(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        groups = optimizer.param_groups
        key = (len(groups), sum(len(group["params"]) for group in groups))
        if key != self._key:
            self._key = key
            self._params = [p for group in groups for p in group["params"]]
        return self._params


def finish_accumulation(model: nn.Module, params: list[torch.Tensor], ran: int, planned: int, synced: bool) -> None:
    """Make the gradients of `ran` of `planned` micro-steps those of a full step."""
    if not synced:
        # The micro-step that would have all-reduced produced no loss (or the data ended
        # first): sync by hand. Ranks agree: under DDP they run the same backward passes.
        distributed.all_reduce_gradients(model, params)
    if ran < planned:
        # Skipped micro-steps (None loss, end of data): the mean over the ones that ran.
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, planned / ran)


def clip_and_measure(params: list[torch.Tensor], max_norm: float | None, device: torch.device) -> torch.Tensor:
    """The global gradient norm of `params` (one fused reduction), clipped in place to
    `max_norm` when given. FSDP2's sharded gradients give the global norm, as a plain tensor."""
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    else:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=device)
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def finite_on_all_ranks(finite: bool, ranks_agree: bool) -> bool:
    """Whether every rank found its gradients finite. Ranks whose gradients no wrapper
    synchronised can disagree; then all retry together, or one would wait forever in the
    others' next all-reduce."""
    return finite if ranks_agree else not distributed.agree_max(int(not finite))
