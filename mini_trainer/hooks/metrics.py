"""Moved to `mini_trainer.metrics` (the trainer uses it too); these names still import from here."""

from ..metrics import LATEST_KEYS, RESERVED_NAMES, STEP_KEYS, MetricMeans, StepMetrics

__all__ = ["LATEST_KEYS", "RESERVED_NAMES", "STEP_KEYS", "MetricMeans", "StepMetrics"]
