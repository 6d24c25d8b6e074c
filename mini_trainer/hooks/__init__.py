"""Built-in hooks. Order in the trainer's list never matters: see `BaseHook.priority`."""

from .base import HOOK_EVENTS, BaseHook
from .checkpointing import CheckpointingHook
from .ema import EmaHook
from .logging import LoggingHook
from .memory import CudaMaxMemoryHook
from .progress import ProgressHook

__all__ = ["HOOK_EVENTS", "BaseHook", "CheckpointingHook", "CudaMaxMemoryHook", "EmaHook", "LoggingHook", "ProgressHook"]
