"""ClassificationTrainer: a config-driven BaseTrainer for `(inputs, labels)` batches.

It is what `configs/digits_mlp.py` runs, and a worked example of the subclass API: each
`build_*` builds one thing from its `*_cfg` dict (see `mini_trainer.builder`), `forward`
returns the loss plus an accuracy record that stays on the device, and `BaseTrainer.evaluate()`
scores every held-out split (`val/loss`, `test/accuracy`, ...) as exact means over samples.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .builder import REGISTRY, build_from_cfg, resolve_type
from .data import split_train_loader
from .trainer import BaseTrainer
from .utils import check_number


@REGISTRY.register()
class ClassificationTrainer(BaseTrainer):
    """Cross-entropy classification from configs.

    Args:
        model_cfg: config of the model (or a ready `nn.Module`).
        optimizer_cfg: config of the optimizer, built with `params=model.parameters()`.
        data_cfg: config of a loader, or of a callable returning `{"train": loader,
            <split>: loader, ...}`; the other splits are the `eval_loaders` that `evaluate()`
            and `EvalHook` score.
        lr_scheduler_cfg: optional scheduler config, built with `optimizer=`; a scheduler
            that takes `total_steps` gets `estimated_total_steps()` unless the config sets it.
        label_smoothing: passed to `F.cross_entropy`.
        **kwargs: BaseTrainer keywords (max_steps, grad_clip, mixed_precision, hooks, ...).
    """

    def __init__(
        self,
        *,
        model_cfg: Mapping[str, Any] | nn.Module,
        optimizer_cfg: Mapping[str, Any],
        data_cfg: Mapping[str, Any],
        lr_scheduler_cfg: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, cfg in (("model_cfg", model_cfg), ("optimizer_cfg", optimizer_cfg), ("data_cfg", data_cfg)):
            if not (isinstance(cfg, Mapping) or (name == "model_cfg" and isinstance(cfg, nn.Module))):
                raise TypeError(f"{name} must be a config dict with a 'type' key; got {type(cfg).__name__}")
        if lr_scheduler_cfg is not None and not isinstance(lr_scheduler_cfg, Mapping):
            raise TypeError(f"lr_scheduler_cfg must be a config dict or None; got {type(lr_scheduler_cfg).__name__}")
        check_number("label_smoothing", label_smoothing)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing!r}")
        self.model_cfg = model_cfg
        self.optimizer_cfg = optimizer_cfg
        self.data_cfg = data_cfg
        self.lr_scheduler_cfg = lr_scheduler_cfg
        self.label_smoothing = label_smoothing
        self._held_out: dict[str, Iterable] = {}

    def build_model(self) -> nn.Module:
        if isinstance(self.model_cfg, nn.Module):
            return self.model_cfg
        return build_from_cfg(self.model_cfg)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return build_from_cfg(self.optimizer_cfg, params=self.model.parameters())

    def build_lr_scheduler(self) -> Any:
        if self.lr_scheduler_cfg is None:
            return None
        cfg = dict(self.lr_scheduler_cfg)
        factory = resolve_type(cfg.get("type"))
        if "total_steps" not in cfg and "total_steps" in _parameters(factory):
            total = self.estimated_total_steps()  # max_steps, or max_epochs x the loader's length
            if total is None:
                raise ValueError(
                    "lr_scheduler_cfg needs total_steps: neither max_steps nor max_epochs with a sized loader gives it"
                )
            cfg["total_steps"] = total
        return build_from_cfg(cfg, optimizer=self.optimizer)

    def build_data_loader(self) -> Iterable:
        train, self._held_out = split_train_loader(build_from_cfg(self.data_cfg), "data_cfg")
        return train

    def build_eval_loaders(self) -> Mapping[str, Iterable] | None:
        """`eval_loaders=` when given, else data_cfg's splits other than "train"."""
        return self.given("eval_loaders") or self._held_out or None

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, labels = batch
        logits = self.model(inputs)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return loss, {"accuracy": accuracy.detach()}

    def eval_forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """`loss` (plain cross-entropy: label smoothing is a training device, and held-out
        losses stay comparable across its settings) and `accuracy` of an evaluation batch."""
        inputs, labels = batch
        logits = self.model(inputs).float()
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return {"loss": F.cross_entropy(logits, labels), "accuracy": accuracy}


def _parameters(factory: Any) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()
