"""`SpelaTrainer`: SPELA's per-layer step on BaseTrainer.

With one micro-batch per step, layer k is updated (and its gradients freed) before layer
k+1 runs, so a step holds one layer's activations and one layer's gradients at a time, not
all of them as backprop does. With gradient accumulation the gradients of every layer
must live until the last micro-batch; the update then happens in the trainer's usual
`optimizer_step`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...builder import REGISTRY
from ...data import split_train_loader
from ...trainer import BaseTrainer, NonFiniteGradientError
from ...utils import eval_mode
from ..config_fields import pop_config_fields
from .config import SpelaConfig
from .net import SpelaNet, negative_cosine

__all__ = ["SpelaTrainer"]


@REGISTRY.register()
class SpelaTrainer(BaseTrainer):
    """Train with SPELA: local per-layer losses, one forward pass, no global backward.

    Either `SpelaTrainer(model, layers, activations, SpelaConfig(num_classes=10, lr=1e-2))`
    (the layers are modules of `model`; activations may be None, modules or callables), or
    `SpelaTrainer(nn.Sequential(...), num_classes=10, ...)` (layers derived from it, see
    `SpelaNet.from_sequential`), or a subclass overriding `build_model` to return a
    `SpelaNet`. Config fields may be keywords; every other keyword is BaseTrainer's
    (max_steps, data_loader, hooks, mixed_precision, gradient_accumulation_steps, ...).
    `grad_clip` (or `grad_clip_norm`) clips each layer separately; `seed` also seeds the
    class vectors. The config's `device`, `amp` and `grad_clip_norm` become the trainer's
    `device`, `mixed_precision="auto"` and `grad_clip`; one given both ways must agree.

    `trainer.evaluate(loader)` returns the accuracy at every exit layer.
    Batches are `(inputs, labels)`. Multi-process runs are refused for now.
    """

    max_processes = 1
    max_processes_reason = "it does not run on several processes yet, its per-layer updates have no gradient sync"

    def __init__(
        self,
        model: nn.Module | None = None,
        layers: Sequence[nn.Module] | None = None,
        activations: Sequence[Any] | None = None,
        config: SpelaConfig | None = None,
        **kwargs: Any,
    ) -> None:
        fields = pop_config_fields(SpelaConfig, kwargs, shared=("seed", "device"))
        for shared in ("seed", "device"):  # seed: the run's and the class vectors'
            if shared in kwargs:
                fields[shared] = kwargs[shared]
        if config is None:
            if "num_classes" not in fields:
                raise TypeError(
                    "SpelaTrainer needs num_classes: pass config=SpelaConfig(num_classes=...) or num_classes=..."
                )
            config = SpelaConfig(**fields)
        elif not isinstance(config, SpelaConfig):
            raise TypeError(f"config must be a SpelaConfig; got {type(config).__name__}")
        elif fields.keys() - {"seed", "device"}:
            raise TypeError(f"give SPELA settings either in config or as keywords, not both: {sorted(fields)}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        _apply_config_to_trainer(config, kwargs)
        self.config = config
        self._user_model = model
        self._user_layers = layers
        self._user_activations = activations
        super().__init__(**kwargs)
        self._layer_params: list[list[nn.Parameter]] = []
        self._layer_norms: list[torch.Tensor] = []
        self._held_out: dict[str, Iterable] = {}

    # ------------------------------------------------------------------ build

    def build_data_loader(self) -> Iterable:
        """`data_loader` may also be `{"train": loader, <split>: loader, ...}` (what
        `digits_loaders` returns): training uses "train", `evaluate()` the other splits."""
        train, self._held_out = split_train_loader(self.given("data_loader", required=True), "data_loader")
        return train

    def build_eval_loaders(self) -> Mapping[str, Iterable] | None:
        """`eval_loaders=` when given, else the splits of `data_loader` other than "train"."""
        return self.given("eval_loaders") or self._held_out or None

    def build_model(self) -> nn.Module:
        if self._user_layers is not None:
            return SpelaNet(self._user_layers, self._user_activations, self.config)
        model = self._user_model
        if isinstance(model, SpelaNet):
            return model
        if isinstance(model, nn.Sequential) and len(model):
            return SpelaNet.from_sequential(model, self.config)
        raise ValueError(
            "SpelaTrainer needs layers: pass layers=[...] (modules of your model, in order), or an "
            "nn.Sequential as model, or override build_model() to return a SpelaNet"
        )

    def build_optimizer(self) -> torch.optim.Optimizer:
        """SGD with one parameter group per layer. A step only moves parameters that have a
        gradient, which is how one layer is updated at a time."""
        cfg = self.config
        net = self.spela_net
        groups = [{"params": [p for p in layer.parameters() if p.requires_grad]} for layer in net.layers]
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def build(self) -> None:
        if self.is_built:
            return
        super().build()
        net = self.spela_net
        if not isinstance(net, SpelaNet):
            raise TypeError(f"build_model() must return a SpelaNet for SpelaTrainer; got {type(net).__name__}")
        owned = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        self._layer_params = [[p for p in layer.parameters() if id(p) in owned] for layer in net.layers]

    @property
    def spela_net(self) -> SpelaNet:
        return self.unwrapped_model  # type: ignore[return-value]

    # ------------------------------------------------------------------ the step

    @property
    def _updates_each_layer_at_once(self) -> bool:
        # One micro-batch per step: a layer's update needs nothing from later layers.
        return self.gradient_accumulation_steps == 1

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs, labels = batch
        net = self.spela_net
        h = inputs
        losses = []
        for k in range(len(net.layers)):
            out = net.layer_output(net.layer_input(h, k), k)
            target = net.vectors(k, out.shape[1], out.device)[labels]
            dtype = torch.promote_types(out.dtype, torch.float32)
            loss = negative_cosine(out.to(dtype), target.to(dtype))
            self._local_backward(loss)
            if self._updates_each_layer_at_once:
                self._update_layer(k)
            losses.append(loss.detach())
            h = out.detach()  # the next layer learns from this, but sends nothing back
        per_layer = torch.stack(losses)
        return per_layer.mean(), {"last_layer_cos": -losses[-1]}

    def _local_backward(self, loss: torch.Tensor) -> None:
        with torch.autocast(self.device.type, enabled=False):  # backward runs outside autocast
            if self.gradient_accumulation_steps > 1:
                loss = loss / self.gradient_accumulation_steps
            if self.active_scaler is not None:
                loss = self.active_scaler.scale(loss)
            loss.backward()

    def backward(self, loss: torch.Tensor) -> None:
        """Nothing left to do: forward() ran each layer's local backward already."""

    def _update_layer(self, k: int) -> None:
        params = self._layer_params[k]
        scaler = self.active_scaler
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # only layer k has gradients now
        check = scaler is None and self.max_non_finite_grad_retries is not None
        # The norm costs a pass over the gradients: only when clipping or the check needs it.
        norm = self._clip_layer(params) if check or self.grad_clip is not None else None
        if check and not math.isfinite(norm):  # one host read per layer (on CUDA: a sync per layer)
            # Earlier layers of this batch are already updated, so the step cannot be redone.
            raise NonFiniteGradientError(
                f"non-finite gradients in layer {k + 1} at step {self.step + 1}: check the learning rate and the data "
                "(SpelaTrainer updates layer by layer and cannot retry a step; "
                "max_non_finite_grad_retries=None skips this check)"
            )
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # this layer's gradients are freed before the next layer runs
        if norm is not None:
            self._layer_norms.append(norm)

    def _clip_layer(self, params: list[nn.Parameter]) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        if self.grad_clip is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    def clip_and_measure_gradients(self) -> torch.Tensor | None:
        """With accumulation: clip each layer on its own, report the overall norm."""
        norms = [self._clip_layer(params) for params in self._layer_params]
        return torch.stack(norms).norm() if norms else None

    def optimizer_step(self) -> bool:
        if not self._updates_each_layer_at_once:
            return super().optimizer_step()
        # The layers were updated during forward(); what is left is the bookkeeping.
        if self._layer_norms:
            self.step_info["grad_norm"] = torch.stack(self._layer_norms).norm()
            self._layer_norms = []
        self.step_info["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return True

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, exit_layer: int = -1) -> torch.Tensor:
        """Class indices: argmax of the cosine to each class vector at `exit_layer`."""
        self.build()
        with eval_mode(self.spela_net) as net, self.autocast():
            return net(inputs.to(self.device, non_blocking=True), exit_layer).argmax(dim=1)

    @torch.no_grad()
    def evaluate(self, loader: Iterable | Mapping[str, Iterable] | None = None) -> dict[str, float]:
        """Accuracy at every exit layer: `{"exit_1_accuracy": ..., ..., "accuracy": <last>}`
        (a dict of loaders gives `<name>_exit_1_accuracy`, ..., `<name>_accuracy`; None:
        the held-out splits given with `data_loader={"train": ..., "test": ...}`)."""
        self.build()
        if loader is None:
            loader = self.eval_loaders
        if isinstance(loader, Mapping):
            results: dict[str, float] = {}
            for name, each in loader.items():
                results.update({f"{name}_{k}": v for k, v in self.evaluate(each).items()})
            return results
        net = self.spela_net
        correct = torch.zeros(len(net.layers), dtype=torch.float64, device=self.device)
        count = 0
        with eval_mode(net):
            for inputs, labels in loader:
                inputs = inputs.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                h = inputs
                with self.autocast():
                    for k in range(len(net.layers)):
                        h = net.layer_output(net.layer_input(h, k), k)
                        correct[k] += (net.similarities(h, k).argmax(dim=1) == labels).sum()
                count += labels.numel()
        accuracy = (correct / max(count, 1)).tolist()  # one host transfer
        results = {f"exit_{k + 1}_accuracy": a for k, a in enumerate(accuracy)}
        results["accuracy"] = accuracy[-1]
        return results


def _device_name(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def _apply_config_to_trainer(config: SpelaConfig, kwargs: dict[str, Any]) -> None:
    """The config's trainer settings become BaseTrainer keywords; explicit keywords that
    disagree with them are an error naming both."""
    def conflict(keyword: str, field: str) -> ValueError:
        return ValueError(
            f"SpelaTrainer got {keyword}={kwargs[keyword]!r} and SpelaConfig.{field}={getattr(config, field)!r}, "
            f"which disagree ({field} is the trainer's {keyword}): give one of them"
        )

    if config.grad_clip_norm is not None:
        if kwargs.get("grad_clip") not in (None, config.grad_clip_norm):
            raise conflict("grad_clip", "grad_clip_norm")
        kwargs["grad_clip"] = config.grad_clip_norm
    if config.device is not None:
        if "device" in kwargs and _device_name(kwargs["device"]) != _device_name(config.device):
            raise conflict("device", "device")
        kwargs["device"] = config.device
    if config.amp:
        if kwargs.get("mixed_precision", "auto") != "auto":
            raise ValueError(
                f"SpelaTrainer got mixed_precision={kwargs['mixed_precision']!r} and SpelaConfig.amp=True, which "
                "disagree (amp=True is mixed_precision='auto', the device's best dtype): give one of them"
            )
        kwargs["mixed_precision"] = "auto"
