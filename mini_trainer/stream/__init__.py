"""Training as a stream of events (being split into modules: see stages.py for now)."""

from .stages import *  # noqa: F403
from .stages import __all__  # noqa: F401
