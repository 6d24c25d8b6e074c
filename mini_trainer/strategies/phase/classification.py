"""PhaseTrainer for classification from a config file (what `configs/phase_digits.py` runs)."""

from __future__ import annotations

from ...builder import REGISTRY
from ...classification import ClassificationTrainer
from .trainer import PhaseTrainer

__all__ = ["PhaseClassificationTrainer"]


@REGISTRY.register()
class PhaseClassificationTrainer(PhaseTrainer, ClassificationTrainer):
    """`ClassificationTrainer` (model, optimizer, data and scheduler from `*_cfg` dicts,
    cross-entropy, `evaluate()` on the held-out splits) whose steps follow PhaseTrainer's
    phases. Takes both trainers' keywords: `phase=PhaseConfig(...)` or its fields
    (`full_steps=5, predict_steps=20, ...`), and `model_cfg`, `optimizer_cfg`, `data_cfg`,
    `lr_scheduler_cfg`, `label_smoothing`, plus BaseTrainer's.

    A plain `PhaseTrainer` needs ready objects (an optimizer built on the model's
    parameters, a `forward_fn`), which a config file cannot give; this builds them.
    """
