"""PhaseTrainer's settings: the phases of a cycle and the `PhaseConfig` that sizes them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ...utils import check_int, check_number

__all__ = ["Phase", "PhaseConfig"]

_PREDICTORS = ("least_squares", "momentum")
_STORAGE = ("full", "ternary", "vsa")


class Phase(str, Enum):
    """What a step does: WARMUP / FULL / CORRECT run a real backward, PREDICT does not."""

    WARMUP = "warmup"
    FULL = "full"
    PREDICT = "predict"
    CORRECT = "correct"


@dataclass
class PhaseConfig:
    """Phase lengths and predictor settings; defaults as in the crate's deterministic trainer.

    Args:
        warmup_steps: full steps before the first cycle (at least 2: the fit needs history).
        full_steps / predict_steps: length of the FULL and PREDICT phases of a cycle.
        correct_every: a CORRECT step at every multiple of this inside PREDICT.
        history_window: full gradients the least-squares fit uses.
        adaptive_phases: adjust the lengths on entering FULL from the last 100 losses.
        loss_threshold: relative loss rise that means "more full steps".
        max_grad_norm: clipping (the trainer's `grad_clip` when that is not given).
        predictor: "least_squares" or "momentum" (g[-1] + beta (g[-1] - g[-2])).
        momentum_beta: beta of the momentum predictor.
        weight_decay: weight 0.95^age of older gradients in the fit.
        residual_decay: the residual's EMA decay at CORRECT, and its fade per predicted step.
        residual_threshold: a CORRECT step comes early when ||residual|| / ||last gradient||
            exceeds this (read once per CORRECT step, not per step).
        history_storage: "full" (float copies), "ternary" (packed 2-bit, 16x smaller) or
            "vsa" (one ternary hypervector of `vsa_dim_ratio` x the size per entry).
        vsa_dim_ratio: hypervector size relative to the number of parameters.
        ternary_accumulation: with gradient accumulation, hold the running sum of the
            micro-steps' gradients as packed trits between micro-steps (stochastic,
            unbiased) instead of float32.
        skip_forward: PREDICT steps do not run the model at all (no loss is reported).
        extrapolate: least squares predicts b + v dt (the crate); False predicts the fitted
            value at the newest gradient, b, for every step (no extrapolation of the
            minibatch noise along the slope).
        seed: seeds the stochastic quantisation and the VSA projection.
    """

    warmup_steps: int = 10
    full_steps: int = 5
    predict_steps: int = 20
    correct_every: int = 5
    history_window: int = 8
    adaptive_phases: bool = False
    loss_threshold: float = 0.1
    max_grad_norm: float | None = 1.0
    predictor: str = "least_squares"
    momentum_beta: float = 0.9
    weight_decay: float = 0.95
    residual_decay: float = 0.95
    residual_threshold: float = 0.5
    history_storage: str = "full"
    vsa_dim_ratio: float = 0.25
    ternary_accumulation: bool = False
    skip_forward: bool = False
    extrapolate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("PhaseConfig.warmup_steps", self.warmup_steps, minimum=0)
        check_int("PhaseConfig.full_steps", self.full_steps, minimum=1)
        check_int("PhaseConfig.predict_steps", self.predict_steps, minimum=0)
        check_int("PhaseConfig.correct_every", self.correct_every, minimum=1)
        check_int("PhaseConfig.history_window", self.history_window, minimum=2)
        check_int("PhaseConfig.seed", self.seed)
        check_number("PhaseConfig.loss_threshold", self.loss_threshold, positive=True)
        check_number("PhaseConfig.max_grad_norm", self.max_grad_norm, positive=True, allow_none=True)
        check_number("PhaseConfig.vsa_dim_ratio", self.vsa_dim_ratio, positive=True)
        check_number("PhaseConfig.residual_threshold", self.residual_threshold, positive=True)
        for name in ("momentum_beta", "weight_decay", "residual_decay"):
            value = getattr(self, name)
            check_number(f"PhaseConfig.{name}", value)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"PhaseConfig.{name} must be in [0, 1]; got {value!r}")
        if self.predictor not in _PREDICTORS:
            raise ValueError(f"PhaseConfig.predictor must be one of {_PREDICTORS}; got {self.predictor!r}")
        if self.history_storage not in _STORAGE:
            raise ValueError(f"PhaseConfig.history_storage must be one of {_STORAGE}; got {self.history_storage!r}")
        for name in ("adaptive_phases", "ternary_accumulation", "skip_forward", "extrapolate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"PhaseConfig.{name} must be True or False; got {getattr(self, name)!r}")
