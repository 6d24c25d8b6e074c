"""PhaseTrainer: predicted gradients replace most backward passes (after vsa-optim-rs).

Training runs in cycles: FULL steps (forward + backward) record the real gradients; then
PREDICT steps set each parameter's gradient to a prediction fitted on that history and
skip backward (the forward runs under `torch.no_grad()` only to report the loss, or not at
all with `skip_forward=True`); inside PREDICT, every `correct_every`-th step is a CORRECT
step, a real backward that measures the prediction's error and refits. The optimizer,
clipping, AMP and hooks see an ordinary step every time.

    FULL x full_steps -> PREDICT (CORRECT when phase_step > 0 and phase_step % correct_every == 0,
    phase_step not reset by it) until phase_step reaches predict_steps -> FULL (next cycle)

An optional WARMUP of full steps comes first, at least as long as the predictor needs history.

`PhaseController` is the machine alone, for a loop of your own; `PhaseTrainer` drives it;
`PhaseClassificationTrainer` is PhaseTrainer built from a config file.

Modules: `config` (Phase, PhaseConfig), `history` (the stored gradients), `predictors`,
`controller` (PhaseController, PhaseStep), `trainer` (PhaseTrainer), `classification`.
"""

import warnings
from typing import Any

# Importable from here before the module became a package; they live in ..compression.
from ..compression import (  # noqa: F401
    TernaryCode,
    TernaryGradientAccumulator,
    VSACode,
    VSAGradientCompressor,
    gradient_cosine,
    ternarize,
)
from .classification import PhaseClassificationTrainer
from .config import Phase, PhaseConfig
from .controller import PhaseController, PhaseStep
from .history import GradientHistory
from .predictors import LeastSquaresPredictor, MomentumPredictor
from .trainer import PhaseTrainer

__all__ = [
    "Phase",
    "PhaseConfig",
    "PhaseStep",
    "PhaseController",
    "PhaseTrainer",
    "PhaseClassificationTrainer",
    "LeastSquaresPredictor",
    "MomentumPredictor",
    "GradientHistory",
]


def __getattr__(name: str) -> Any:
    # `StepInfo` was PhaseStep's name; it read like the trainer's `step_info` dict.
    if name == "StepInfo":
        warnings.warn("StepInfo is deprecated: it is now called PhaseStep", DeprecationWarning, stacklevel=2)
        return PhaseStep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
