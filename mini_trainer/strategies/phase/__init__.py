"""PhaseTrainer: predicted gradients replace most backward passes (see `.trainer`)."""

from .trainer import LeastSquaresPredictor, MomentumPredictor, Phase, PhaseConfig, PhaseController, PhaseTrainer, StepInfo

__all__ = ["Phase", "PhaseConfig", "StepInfo", "PhaseController", "PhaseTrainer", "LeastSquaresPredictor", "MomentumPredictor"]
