"""Augmenters and trackers that read the model in each event: `evaluate` and
`validation_loss` compute metrics on held-out tensors (for `augment`); `best_model` keeps
the best state seen so far (for `tap`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from typing import Any, Literal

import torch
from torch import nn

from ..utils import eval_mode
from .checks import detail
from .sinks import _select
from .sources import TENSORS


def evaluate(
    val_data: Sequence[torch.Tensor],
    *,
    metrics: Mapping[str, Callable[..., torch.Tensor | float]],
    last_label: bool = True,
) -> Callable[[dict[str, Any]], dict[str, float]]:
    """An augmenter (for `augment`) that computes `metrics` on `val_data` with
    `event["model"]`: one forward pass over the whole set, shared by all metrics.

    Each metric is `fn(predictions, labels)` (or `fn(predictions)` with
    `last_label=False`) returning a number or a one-element tensor; results are floats.
    The model runs in eval mode without gradients; every module's mode is put back after,
    also when a metric raises. Model and data must be on the same device.

    >>> model = nn.Linear(1, 1, bias=False); _ = nn.init.ones_(model.weight)
    >>> x = torch.tensor([[1.0], [2.0]]); y = torch.tensor([[1.0], [3.0]])
    >>> evaluate((x, y), metrics={"mae": lambda p, t: (p - t).abs().mean()})({"model": model})
    {'mae': 0.5}
    """
    # Checked at the call; the event and the metrics (callable? a number?) when it is
    # evaluated, in fitstream's order, with its exception types and messages (plus ours).
    if not val_data:
        raise ValueError("val_data must contain at least one tensor." + detail("val_data", val_data, TENSORS))
    if last_label and len(val_data) < 2:
        raise ValueError(
            "last_label=True requires at least two tensors (inputs and labels)."
            f" Got {len(val_data)} tensor; pass last_label=False for metrics without labels."
        )
    metrics = dict(metrics)
    if not metrics:
        raise ValueError("metrics must contain at least one metric. Got an empty mapping.")
    inputs = tuple(val_data[:-1]) if last_label else tuple(val_data)
    labels = val_data[-1] if last_label else None

    def compute(event: dict[str, Any]) -> dict[str, float]:
        model = event["model"]  # KeyError without one, as in fitstream
        if not isinstance(model, nn.Module):
            raise TypeError(
                "evaluate expects an event containing a 'model' key with a torch.nn.Module."
                f" Got {type(model).__name__}."
            )
        result = {}
        with eval_mode(model), torch.no_grad():
            predictions = model(*inputs)
            for name, fn in metrics.items():
                if not callable(fn):
                    raise TypeError(
                        f"{type(fn).__name__!r} object is not callable."
                        + detail(f"metrics[{name!r}]", fn, "a function (predictions, labels) -> number")
                    )
                value = fn(predictions, labels) if last_label else fn(predictions)
                result[name] = float(value.item() if isinstance(value, torch.Tensor) else value)
        return result

    return compute


def validation_loss(
    val_data: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor],
    *,
    key: str = "val_loss",
    last_label: bool = True,
) -> Callable[[dict[str, Any]], dict[str, float]]:
    """An augmenter that adds `loss_fn` on the whole of `val_data` as `key` (see
    `evaluate`)."""
    return evaluate(val_data, metrics={key: loss_fn}, last_label=last_label)


class BestModel:
    """A `tap` callback that keeps a copy of the model's state from the event with the
    best `metric_key` so far (strict improvements only: ties keep the earlier copy).

    `device`: where the copies live (None: the model's own devices; "cpu" saves GPU
    memory). After the stream has run, `load_into(model)` puts the best state into a
    model; optimizer and scheduler states are not kept.
    """

    def __init__(self, metric_key: str, direction: Literal["min", "max"], device: str | torch.device | None) -> None:
        if direction not in ("min", "max"):
            message = "direction must be one of {'min', 'max'}."
            raise ValueError(message + detail("direction", direction, "'min' or 'max'"))
        self.metric_key = metric_key
        self.direction = direction
        self.device = device
        self.best: float | None = None
        self.best_event: dict[str, Any] | None = None  # the chosen event's metrics (no model)
        self._state: dict[str, Any] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        value = float(event[self.metric_key])
        if not math.isfinite(value):
            raise ValueError(f"Metric {self.metric_key!r} must be finite. Got {value!r}.")
        better = self.best is None or (value < self.best if self.direction == "min" else value > self.best)
        if better:
            self._state = _copy_state(event["model"], self.device)
            self.best = value
            self.best_event = _select(event, None, None)

    def load_into(self, model: nn.Module) -> None:
        """Copy the best state into `model` (its parameters keep their identity, device
        and dtype). Raises RuntimeError before any event was seen."""
        if self._state is None:
            raise RuntimeError(
                f"No model state has been captured yet. BestModel({self.metric_key!r}) has seen no event:"
                " run the stream first."
            )
        # A deep copy, so that loading twice (or a module mutating its extra state) never
        # changes the kept snapshot.
        model.load_state_dict(deepcopy(self._state))


def _copy_state(model: nn.Module, device: str | torch.device | None) -> dict[str, Any]:
    state = model.state_dict()
    # Tensors are copied straight to `device` (no temporary on the model's device);
    # non-tensor extra state is deep-copied; shared tensors stay shared.
    memo = {id(t): t.detach().to(device=device, copy=True) for t in state.values() if isinstance(t, torch.Tensor)}
    return deepcopy(state, memo)


def best_model(
    metric_key: str, *, direction: Literal["min", "max"] = "min", device: str | torch.device | None = None
) -> BestModel:
    """A `BestModel` tracker: `pipe(events, ..., tap(best := best_model("val_loss")))`,
    then `best.load_into(model)`. Put the tap after the stage that computes the metric.

    >>> model = nn.Linear(1, 1)
    >>> best = best_model("val", direction="max")
    >>> for v, w in [(0.5, 1.0), (0.9, 2.0), (0.7, 3.0)]:
    ...     _ = nn.init.constant_(model.weight, w)
    ...     best({"model": model, "val": v})
    >>> best.load_into(model); model.weight.item()
    2.0
    """
    return BestModel(metric_key, direction, device)
