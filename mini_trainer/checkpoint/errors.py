"""The two ways a checkpoint can fail a run: the checkpoint itself, or its directory."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged, crafted, or does not fit the trainer
    (format, hashes, names, dtypes, sizes, shapes, counters). Where a run resumes from its
    newest checkpoint, one with this error is skipped for the previous one."""


class CheckpointDirectoryError(OSError):
    """A checkpoint directory cannot be used for this run: it cannot be created or written
    (the message names the path and the OS error), or another run is writing into it (the
    message names that run's pid and host). Raised before the first training step."""
