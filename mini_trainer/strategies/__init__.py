"""Training strategies: BaseTrainer subclasses that change how a step learns."""

from .class_vectors import class_vectors, min_pairwise_angle
from .spela import SpelaConfig, SpelaNet, SpelaTrainer

__all__ = ["SpelaConfig", "SpelaNet", "SpelaTrainer", "class_vectors", "min_pairwise_angle"]
