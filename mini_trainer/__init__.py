"""mini_trainer: a small, hackable PyTorch training framework.

Subclass `BaseTrainer` (or pass ready objects to it), add hooks, train. See README.md.
"""

from . import checkpoint, data, datasets, models, schedules, strategies, stream  # noqa: F401  (register their builders)
from .builder import REGISTRY, Registry, build_from_cfg
from .classification import ClassificationTrainer
from .config import load_config
from .hooks import (
    BaseHook,
    CheckpointingHook,
    CsvLoggerHook,
    CudaMaxMemoryHook,
    EarlyStoppingHook,
    EmaHook,
    EvalHook,
    ImageFileLoggerHook,
    LoggingHook,
    MfuHook,
    ProgressHook,
    TensorBoardHook,
    WandbHook,
)
from .resume_check import ResumeReport, check_resume
from .trainer import BaseTrainer, NonFiniteGradientError
from .utils import key_average, map_nested_tensor, unwrap

__version__ = "0.1.0"

__all__ = [
    "BaseTrainer",
    "NonFiniteGradientError",
    "ResumeReport",
    "check_resume",
    "ClassificationTrainer",
    "BaseHook",
    "ProgressHook",
    "LoggingHook",
    "MfuHook",
    "CheckpointingHook",
    "EmaHook",
    "EvalHook",
    "EarlyStoppingHook",
    "CudaMaxMemoryHook",
    "WandbHook",
    "ImageFileLoggerHook",
    "TensorBoardHook",
    "CsvLoggerHook",
    "REGISTRY",
    "Registry",
    "build_from_cfg",
    "load_config",
    "key_average",
    "map_nested_tensor",
    "unwrap",
]
