"""SPELA: learning with a single forward pass (Somasundaram, Mishra, Borthakur, arXiv:2402.09769).

Every trained layer k has fixed unit vectors v_k[c], one per class, of its output width
(`class_vectors`: a regular simplex or an energy-minimising spread). One step, per batch:

    h_0 = the input
    for k = 1..K:
        h_k = act_k(layer_k(normalise(h_{k-1})))          # unit L2 norm in, per sample
        loss_k = -cos(h_k, v_k[y]).mean()                 # a loss local to layer k
        loss_k.backward(); update layer k                 # no gradient crosses layers
        h_k = h_k.detach()                                # only this activation lives on

Prediction is argmax_c cos(h_k, v_k[c]) at the last layer or any earlier one ("early exit").

With one micro-batch per step, layer k is updated (and its gradients freed) before layer
k+1 runs, so a step holds one layer's activations and one layer's gradients at a time, not
all of them as backprop does. With gradient accumulation the gradients of every layer
must live until the last micro-batch; the update then happens in the trainer's usual
`optimizer_step`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..builder import REGISTRY
from ..data import split_train_loader
from ..trainer import BaseTrainer, NonFiniteGradientError
from ..utils import check_choice, check_int, check_number, eval_mode
from .class_vectors import class_vectors
from .config_fields import pop_config_fields

__all__ = ["SpelaConfig", "SpelaNet", "SpelaTrainer"]


@dataclasses.dataclass
class SpelaConfig:
    """SPELA's settings (also accepted as `SpelaTrainer` keywords).

    num_classes: classes of the task. lr, momentum, weight_decay: each layer's SGD.
    normalize_layer_inputs: L2-normalise every layer's input, the raw input included.
    auto_flatten: flatten the raw input for a first `nn.Linear`, and any layer output that
        is not yet a vector per sample (a CNN block without pool + flatten); False raises.
    embeddings_method: "energy" (least electrostatic energy; a regular simplex when
        classes <= width + 1) or "random" (normalised Gaussian).
    seed: the class vectors' seed (layer k uses seed + k).
    grad_clip: clip each layer's gradient norm to this (None: no clipping).
    """

    num_classes: int
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    normalize_layer_inputs: bool = True
    auto_flatten: bool = True
    embeddings_method: str = "energy"
    seed: int = 0
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        check_int("SpelaConfig.num_classes", self.num_classes, minimum=2)
        check_number("SpelaConfig.lr", self.lr, positive=True)
        check_number("SpelaConfig.momentum", self.momentum)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"SpelaConfig.momentum must be in [0, 1); got {self.momentum!r}")
        check_number("SpelaConfig.weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise ValueError(f"SpelaConfig.weight_decay must be >= 0; got {self.weight_decay!r}")
        check_choice("SpelaConfig.embeddings_method", self.embeddings_method, ("energy", "random"))
        check_int("SpelaConfig.seed", self.seed)
        check_number("SpelaConfig.grad_clip", self.grad_clip, positive=True, allow_none=True)


_NORMALISATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class SpelaNet(nn.Module):
    """The trained layers, their activations and (computed, not stored) class vectors.

    The class vectors are a deterministic function of (num_classes, width, method, seed + k),
    so they are recomputed rather than saved: checkpoints hold only the layers."""

    def __init__(self, layers: Sequence[nn.Module], activations: Sequence[Any] | None, config: SpelaConfig) -> None:
        super().__init__()
        if not layers:
            raise ValueError("SPELA needs at least one layer to train")
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Module) or not any(p.requires_grad for p in layer.parameters()):
                raise TypeError(f"layers[{i}] must be an nn.Module with trainable parameters; got {layer!r}")
        if activations is None:
            activations = [None] * len(layers)
        if len(activations) != len(layers):
            raise ValueError(f"activations must have one entry per layer ({len(layers)}); got {len(activations)}")
        self.layers = nn.ModuleList(layers)
        self.activations = nn.ModuleList(_as_module(a, i) for i, a in enumerate(activations))
        self.config = config
        self._vectors: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    @classmethod
    def from_sequential(cls, model: nn.Sequential, config: SpelaConfig) -> SpelaNet:
        """Split an `nn.Sequential` into trained layers: every module with parameters starts
        one (normalisation layers stay with the layer before them), and the parameter-free
        modules after it (activation, dropout, pooling, flatten) become its activation."""
        layers: list[nn.Module] = []
        activations: list[list[nn.Module]] = []
        leading: list[nn.Module] = []
        for module in model:
            has_params = any(True for _ in module.parameters())
            if has_params and not (isinstance(module, _NORMALISATION) and layers):
                layers.append(nn.Sequential(*leading, module) if leading else module)
                activations.append([])
                leading = []
            elif layers:
                activations[-1].append(module)
            else:
                leading.append(module)  # e.g. a Flatten before the first layer
        if not layers:
            raise ValueError("the nn.Sequential has no module with parameters: nothing to train")
        acts = [nn.Sequential(*a) if len(a) > 1 else (a[0] if a else None) for a in activations]
        return cls(layers, acts, config)

    def vectors(self, k: int, width: int, device: torch.device) -> torch.Tensor:
        key = (k, width, device)
        if key not in self._vectors:
            cfg = self.config
            self._vectors[key] = class_vectors(cfg.num_classes, width, cfg.embeddings_method, cfg.seed + k).to(device)
        return self._vectors[key]

    def layer_input(self, h: torch.Tensor, k: int) -> torch.Tensor:
        if k == 0 and h.ndim > 2 and isinstance(self.layers[0], nn.Linear) and self.config.auto_flatten:
            h = h.flatten(1)
        if self.config.normalize_layer_inputs:
            h = h / h.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (h.ndim - 1)))
        return h

    def layer_output(self, h: torch.Tensor, k: int) -> torch.Tensor:
        out = self.activations[k](self.layers[k](h))
        if out.ndim != 2:
            if not self.config.auto_flatten:
                raise ValueError(
                    f"layer {k + 1} gives an output of shape {tuple(out.shape)}; SPELA needs one vector per "
                    "sample: end the block with pooling + nn.Flatten() (or set auto_flatten=True)"
                )
            out = out.flatten(1)
        return out

    def similarities(self, out: torch.Tensor, k: int) -> torch.Tensor:
        """cos(h_k, v_k[c]) for every class: (batch, num_classes)."""
        vectors = self.vectors(k, out.shape[1], out.device)
        return F.normalize(out.float(), dim=1) @ vectors.T

    def forward(self, x: torch.Tensor, exit_layer: int = -1) -> torch.Tensor:
        """Class similarities at `exit_layer` (an index into the layers; -1: the last)."""
        check_int("exit_layer", exit_layer)
        if not -len(self.layers) <= exit_layer < len(self.layers):
            raise ValueError(
                f"exit_layer must index one of the {len(self.layers)} layers "
                f"(0..{len(self.layers) - 1}, or -1 for the last); got {exit_layer}"
            )
        exit_layer %= len(self.layers)
        h = x
        for k in range(exit_layer + 1):
            h = self.layer_output(self.layer_input(h, k), k)
        return self.similarities(h, exit_layer)


@REGISTRY.register()
class SpelaTrainer(BaseTrainer):
    """Train with SPELA: local per-layer losses, one forward pass, no global backward.

    Either `SpelaTrainer(model, layers, activations, SpelaConfig(num_classes=10, lr=1e-2))`
    (the layers are modules of `model`; activations may be None, modules or callables), or
    `SpelaTrainer(nn.Sequential(...), num_classes=10, ...)` (layers derived from it, see
    `SpelaNet.from_sequential`), or a subclass overriding `build_model` to return a
    `SpelaNet`. Config fields may be keywords; every other keyword is BaseTrainer's
    (max_steps, data_loader, hooks, mixed_precision, gradient_accumulation_steps, ...).
    `grad_clip` clips each layer separately; `seed` also seeds the class vectors.

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
        fields = pop_config_fields(SpelaConfig, kwargs, shared=("seed",))
        if "seed" in kwargs:
            fields["seed"] = kwargs["seed"]  # seeds the run and the class vectors
        if config is None:
            if "num_classes" not in fields:
                raise TypeError(
                    "SpelaTrainer needs num_classes: pass config=SpelaConfig(num_classes=...) or num_classes=..."
                )
            config = SpelaConfig(**fields)
        elif not isinstance(config, SpelaConfig):
            raise TypeError(f"config must be a SpelaConfig; got {type(config).__name__}")
        elif fields.keys() - {"seed"}:
            raise TypeError(f"give SPELA settings either in config or as keywords, not both: {sorted(fields)}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
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
            loss = _negative_cosine(out.float(), target)
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
        norm = self._clip_layer(params) if check or self.config.grad_clip is not None else None
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
        if self.config.grad_clip is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip, foreach=True)
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


def _negative_cosine(out: torch.Tensor, unit_targets: torch.Tensor) -> torch.Tensor:
    """-cos(out, target) averaged over the batch; the targets are unit vectors already, so
    this is cheaper than F.cosine_similarity (which normalises both sides)."""
    return -((out * unit_targets).sum(dim=1) / out.norm(dim=1).clamp_min(1e-8)).mean()


class _Function(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _as_module(activation: Any, index: int) -> nn.Module:
    if activation is None:
        return nn.Identity()
    if isinstance(activation, nn.Module):
        return activation
    if callable(activation):
        return _Function(activation)
    raise TypeError(f"activations[{index}] must be None, an nn.Module or a callable; got {activation!r}")
