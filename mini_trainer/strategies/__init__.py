"""Training strategies: BaseTrainer subclasses that change how a step learns."""

import warnings
from typing import Any

from .class_vectors import class_vectors, min_pairwise_angle
from .compression import TernaryGradientAccumulator, VSAGradientCompressor, reconstruction_cosine, ternarize
from .phase import (
    LeastSquaresPredictor,
    MomentumPredictor,
    Phase,
    PhaseClassificationTrainer,
    PhaseConfig,
    PhaseController,
    PhaseStep,
    PhaseTrainer,
)
from .spela import SpelaConfig, SpelaNet, SpelaTrainer
from .surprise_repair import (
    GeneratorProvider,
    HardestK,
    LossStdConfig,
    LossStdTrigger,
    ReplayBuffer,
    SurpriseRepairTrainer,
)

__all__ = [
    "SpelaConfig",
    "SpelaNet",
    "SpelaTrainer",
    "class_vectors",
    "min_pairwise_angle",
    "Phase",
    "PhaseConfig",
    "PhaseController",
    "PhaseTrainer",
    "PhaseClassificationTrainer",
    "PhaseStep",
    "LeastSquaresPredictor",
    "MomentumPredictor",
    "TernaryGradientAccumulator",
    "VSAGradientCompressor",
    "ternarize",
    "reconstruction_cosine",
    "SurpriseRepairTrainer",
    "LossStdTrigger",
    "LossStdConfig",
    "HardestK",
    "ReplayBuffer",
    "GeneratorProvider",
]


def __getattr__(name: str) -> Any:
    # `StepInfo` was PhaseStep's name; it read like the trainer's `step_info` dict.
    if name == "StepInfo":
        warnings.warn("StepInfo is deprecated: it is now called PhaseStep", DeprecationWarning, stacklevel=2)
        return PhaseStep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
