"""EmaHook: an exponential moving average of the model's weights, for evaluation.

After every `update_interval`-th step, each floating-point parameter and buffer becomes
`ema = decay * ema + (1 - decay) * current` (one fused `torch._foreach_lerp_` over all
tensors); integer buffers such as BatchNorm's `num_batches_tracked` are copied. The EMA
weights are saved with every checkpoint (in `ema.safetensors`, under the model's own
parameter names) and restored on resume, whatever the order of the hooks.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import distributed
from ..builder import REGISTRY
from ..utils import check_int, check_number
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

logger = logging.getLogger("mini_trainer")


@REGISTRY.register()
class EmaHook(BaseHook):
    """Keep `hook.ema_model`, an EMA copy of the trainer's (unwrapped) model.

    Args:
        decay: weight of the old average at each update, in [0, 1]. The average spans
            about 1 / (1 - decay) updates (0.9999: ~10k updates).
        update_interval: update after every this-many optimizer steps (the decay applies
            per update, so a larger interval with the same decay averages a longer span).
        device: where the EMA copy lives (None: with the model; "cpu" saves GPU memory at
            the price of a copy of the weights per update). fp16/bf16 weights are averaged
            in float32 (a low-precision average stops moving for decays near 1).
        name: key of this hook's state in the checkpoint, and its file `<name>.safetensors`
            (two EMA hooks need two names).

    Use it for evaluation: `trainer.evaluate(model=hook.ema_model)` or
    `hook.ema_model(inputs)`; it is in eval mode and needs no gradients.
    """

    # Update before EvalHook (5) scores the average and the checkpointing hook (100) saves it.
    priority = {"on_after_step": 1, "default": 0}

    def __init__(
        self,
        decay: float = 0.9999,
        update_interval: int = 1,
        device: str | torch.device | None = None,
        name: str = "ema",
    ) -> None:
        check_number("EmaHook.decay", decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EmaHook.decay must be in [0, 1]; got {decay!r}")
        check_int("EmaHook.update_interval", update_interval, minimum=1)
        if not isinstance(name, str) or not name.isidentifier() or name in ("model", "optimizer", "manifest"):
            raise ValueError(
                "EmaHook.name must be a plain identifier such as 'ema', other than model/optimizer/manifest; "
                f"got {name!r}"
            )
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(
                    f"EmaHook.device must be None or a device such as 'cpu' or 'cuda:0'; got {device!r} ({err})"
                ) from None
        self.decay = float(decay)
        self.update_interval = update_interval
        self.device = device
        self.name = name
        self.ema_model: nn.Module | None = None
        self.updates = 0

    @property
    def checkpoint_files(self) -> dict[str, str]:
        """Tells the checkpointing hook to put the EMA weights in a file of their own."""
        return {f"hooks.{self.name}.weights": f"{self.name}.safetensors"}

    def on_before_train(self, trainer: BaseTrainer) -> None:
        self._ensure_ema_model(trainer)

    def on_after_step(self, trainer: BaseTrainer) -> None:
        if trainer.step % self.update_interval == 0:
            self.update(trainer.unwrapped_model)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards `model`'s current weights."""
        if self.ema_model is None:
            raise RuntimeError(
                "EmaHook.update before the EMA copy exists: train with the hook, or call on_before_train(trainer)"
            )
        averaged, current, copied, copied_from = [], [], [], []
        for ema_tensor, tensor in zip(_tensors(self.ema_model), _tensors(model), strict=False):
            if ema_tensor.is_floating_point():
                averaged.append(ema_tensor)
                current.append(tensor)
            else:
                copied.append(ema_tensor)
                copied_from.append(tensor)
        if self.device is not None:
            # Blocking copies: a non_blocking device-to-host copy could still be in flight
            # when the CPU reads it below.
            current = [t.to(self.device) for t in current]
            copied_from = [t.to(self.device) for t in copied_from]
        if averaged:
            torch._foreach_lerp_(
                averaged, [t.to(a.dtype) for a, t in zip(averaged, current, strict=True)], 1.0 - self.decay
            )
        if copied:
            torch._foreach_copy_(copied, copied_from)
        self.updates += 1

    def on_state_dict(self, trainer: BaseTrainer, state_dict: dict[str, Any]) -> None:
        self._ensure_ema_model(trainer)
        assert self.ema_model is not None
        state_dict["hooks"][self.name] = {
            "updates": self.updates,
            "decay": self.decay,
            "weights": self.ema_model.state_dict(),
        }

    def on_load_state_dict(self, trainer: BaseTrainer, state_dict: Mapping[str, Any]) -> None:
        # May run before on_before_train (the checkpointing hook resumes first): the copy is
        # made here from the model, which the trainer has already restored.
        self._ensure_ema_model(trainer)
        assert self.ema_model is not None
        saved = (state_dict.get("hooks") or {}).get(self.name)
        if saved is None:
            logger.warning(
                "EmaHook: the checkpoint has no %r state; the average restarts from the loaded weights", self.name
            )
            self.ema_model.load_state_dict(trainer.unwrapped_model.state_dict())
            self.updates = 0
            return
        self.ema_model.load_state_dict(saved["weights"])
        self.updates = int(saved["updates"])

    def _ensure_ema_model(self, trainer: BaseTrainer) -> None:
        if self.ema_model is not None:
            return
        model = trainer.unwrapped_model
        if distributed.is_fsdp2(model):
            raise NotImplementedError(
                "EmaHook does not support FSDP2 models (parallelism='fsdp'): their parameters are "
                "sharded and cannot be copied whole; use parallelism='ddp' with EmaHook, or drop the hook"
            )
        ema = copy.deepcopy(model)
        ema.requires_grad_(False)
        ema.eval()
        if self.device is not None:
            ema.to(self.device)
        # Averages in fp16/bf16 stall: with decay 0.999 an update is 0.1% of the distance,
        # below bf16's resolution of ~0.4%. Low-precision tensors are averaged in float32.
        for tensor in _tensors(ema):
            if tensor.dtype in (torch.float16, torch.bfloat16):
                tensor.data = tensor.data.float()
        self.ema_model = ema


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, in registration order (a deepcopy keeps that order)."""
    return [*model.parameters(), *model.buffers()]
