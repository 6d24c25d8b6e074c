"""Small reference models used by the bundled configs, examples and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .builder import REGISTRY
from .utils import check_choice, check_int, check_number

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@REGISTRY.register()
class MLP(nn.Sequential):
    """`in_features -> hidden_sizes... -> out_features`, with an activation (and optional
    dropout) after every hidden layer."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_sizes: Sequence[int] = (256, 256),
        activation: str = "gelu",
        dropout: float = 0.0,
    ) -> None:
        check_int("in_features", in_features, minimum=1)
        check_int("out_features", out_features, minimum=1)
        if not isinstance(hidden_sizes, (list, tuple)):
            raise TypeError(f"hidden_sizes must be a list of positive integers; got {hidden_sizes!r}")
        for i, size in enumerate(hidden_sizes):
            check_int(f"hidden_sizes[{i}]", size, minimum=1)
        check_choice("activation", activation, tuple(_ACTIVATIONS))
        check_number("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)
