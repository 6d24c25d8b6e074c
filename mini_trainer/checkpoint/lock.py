"""One run per checkpoint directory: an exclusive `flock` on `<root>/.lock`, held while a
run writes there, and a probe that the directory can be written at all.

Without the lock, two runs started in one workspace delete each other's temporaries,
prune each other's checkpoints and can resume from each other's weights. The kernel
releases a flock when its holder dies (SIGKILL, OOM), so a crashed run never blocks its
restart. The lock file records the holder (pid, host, start time) for the error message a
second run gets. DataLoader workers forked while the lock is held close their copy of the
descriptor, so a worker that outlives its parent for a moment cannot keep the lock.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path

from .errors import CheckpointDirectoryError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are not protected there
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("mini_trainer")

LOCK_FILE = ".lock"
_held_descriptors: set[int] = set()


def _close_in_forked_child() -> None:
    # Closing (never unlocking: that would release the parent's lock) drops the child's
    # reference to the lock's open file description.
    for fd in list(_held_descriptors):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_descriptors.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_forked_child)


def prepare_directory(root: Path) -> None:
    """Create `root` if needed and prove that files can be created, written, fsynced and
    removed in it; a CheckpointDirectoryError naming the path and the OS error otherwise
    (a read-only disk, a path that is a file, `/dev/null`, a full disk, no permission)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            with open(probe, "wb") as f:
                f.write(b"mini_trainer write probe\n")
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        raise CheckpointDirectoryError(
            err.errno, f"cannot write checkpoints to {str(root)!r}: {err.strerror or err}; choose a writable directory"
        ) from None


class DirectoryLock:
    """An exclusive lock on a checkpoint directory for one run (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock at once or raise CheckpointDirectoryError naming the holder."""
        if self._fd is not None or fcntl is None:
            return
        path = self.root / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            raise CheckpointDirectoryError(
                err.errno, f"cannot create the lock file {str(path)!r}: {err.strerror or err}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise CheckpointDirectoryError(
                f"{str(self.root)!r} is in use by another run ({holder}): two runs writing one checkpoint "
                "directory would delete and resume from each other's checkpoints. Wait for it to end, stop it, "
                "or give this run another workspace or CheckpointingHook(path=...)"
            ) from None
        except OSError as err:  # a filesystem without flock (some network mounts)
            os.close(fd)
            logger.warning(
                "cannot lock %s (%s): a second run in this directory would not be detected", path, err.strerror or err
            )
            return
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode() + b"\n", 0)
        self._fd = fd
        _held_descriptors.add(fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _held_descriptors.discard(fd)
        try:
            os.ftruncate(fd, 0)  # no stale holder shown to the next run
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor releases the flock


def _describe_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record["started"])))
        return f"pid {int(record['pid'])} on host {str(record['host'])[:100]}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"
