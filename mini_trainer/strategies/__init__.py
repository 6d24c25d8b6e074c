"""Training strategies: BaseTrainer subclasses that change how a step learns."""

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
    if name == "StepInfo":  # PhaseStep's old name: the phase package warns and gives it
        from . import phase

        return phase.StepInfo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
