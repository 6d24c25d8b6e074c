"""Training strategies: BaseTrainer subclasses that change how a step learns."""

from .class_vectors import class_vectors, min_pairwise_angle
from .compression import TernaryGradientAccumulator, VSAGradientCompressor, reconstruction_cosine, ternarize
from .phase import LeastSquaresPredictor, MomentumPredictor, Phase, PhaseConfig, PhaseController, PhaseTrainer, StepInfo
from .spela import SpelaConfig, SpelaNet, SpelaTrainer
from .surprise_repair import GeneratorProvider, HardestK, LossStdConfig, LossStdTrigger, ReplayBuffer, SurpriseRepairTrainer

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
    "StepInfo",
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
