"""Built-in hooks. Order in the trainer's list never matters: see `BaseHook.priority`."""

from .base import HOOK_EVENTS, BaseHook
from .logging import LoggingHook
from .progress import ProgressHook

__all__ = ["HOOK_EVENTS", "BaseHook", "LoggingHook", "ProgressHook"]
