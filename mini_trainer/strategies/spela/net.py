"""`SpelaNet`: SPELA's trained layers, their activations and their (computed) class vectors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...utils import check_int
from ..class_vectors import class_vectors, nonnegative_class_vectors
from .config import SpelaConfig

__all__ = ["SpelaNet", "negative_cosine"]


_NORMALISATION = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
# Outputs that are never negative, and the modules after them that keep them so.
_NON_NEGATIVE = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softplus, nn.Hardsigmoid)
_KEEPS_SIGN = (
    nn.Flatten, nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
)


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
        if config.dtype is not None:
            self.to(dtype=config.dtype)

    def non_negative_output(self, k: int) -> bool:
        """Whether layer k's output ends in a non-negative activation (ReLU, ...), possibly
        followed by pooling, flatten or dropout: known from the modules, not from data."""
        leaves = [m for part in (self.layers[k], self.activations[k]) for m in part.modules() if not any(m.children())]
        leaves = [m for m in leaves if not isinstance(m, _KEEPS_SIGN)]
        return bool(leaves) and isinstance(leaves[-1], _NON_NEGATIVE)

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
            if cfg.nonnegative_vectors and width >= cfg.num_classes and self.non_negative_output(k):
                vectors = nonnegative_class_vectors(cfg.num_classes, width, cfg.seed + k)
            else:
                vectors = class_vectors(cfg.num_classes, width, cfg.embeddings_method, cfg.seed + k)
            self._vectors[key] = vectors.to(device)
        return self._vectors[key]

    def layer_input(self, h: torch.Tensor, k: int) -> torch.Tensor:
        dtype = self.config.dtype
        if k == 0 and dtype is not None and h.is_floating_point() and h.dtype != dtype:
            h = h.to(dtype)
        if k == 0 and h.ndim > 2 and isinstance(self.layers[0], nn.Linear) and self.config.auto_flatten:
            h = h.flatten(1)
        if k > 0 and self.config.center_layer_inputs:
            h = h - h.flatten(1).mean(dim=1).view(-1, *([1] * (h.ndim - 1)))
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
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        return F.normalize(out, dim=1) @ vectors.to(out.dtype).T

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


def negative_cosine(out: torch.Tensor, unit_targets: torch.Tensor) -> torch.Tensor:
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
