"""Built-in hooks. Order in the trainer's list never matters: see `BaseHook.priority`."""

from ..throughput import MfuHook
from . import metrics  # noqa: F401 - moved to mini_trainer.metrics; `hooks.metrics` still resolves
from .base import HOOK_EVENTS, BaseHook
from .checkpointing import CheckpointingHook
from .csv_logger import CsvLoggerHook
from .ema import EmaHook
from .evaluation import EarlyStoppingHook, EvalHook
from .images import ImageFileLoggerHook
from .logging import LoggingHook
from .memory import CudaMaxMemoryHook
from .progress import ProgressHook
from .tensorboard import TensorBoardHook  # imports tensorboard only when training starts
from .wandb import WandbHook  # imports wandb only when a run starts

__all__ = [
    "HOOK_EVENTS",
    "BaseHook",
    "CheckpointingHook",
    "CsvLoggerHook",
    "CudaMaxMemoryHook",
    "EarlyStoppingHook",
    "EmaHook",
    "EvalHook",
    "ImageFileLoggerHook",
    "LoggingHook",
    "MfuHook",
    "ProgressHook",
    "TensorBoardHook",
    "WandbHook",
]
