"""Durable files and their hashes: atomic writes, fsync of files and directories, sha256
of single files and whole trees, and opening a checkpoint's files without following
symbolic links (a checkpoint directory is untrusted input: a link could point anywhere)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError

CHUNK = 64 << 20  # bytes per read/hash unit: big enough that syscalls and GIL hand-offs vanish


def write_file(path: Path, data: str | bytes, *, fsync: bool, atomic: bool = False) -> None:
    """Write `data` (text as UTF-8) to `path`. `atomic`: through a temporary file in the same
    directory renamed into place, so a reader (or a process killed mid-write) sees the old
    file or the whole new one, and a failed write leaves no temporary behind. `fsync`: on
    disk before returning (and the rename too), so it also survives a power loss."""
    path = Path(path)
    target = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}") if atomic else path
    try:
        with open(target, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if atomic:
            os.replace(target, path)
    except BaseException:
        if atomic:
            target.unlink(missing_ok=True)
        raise
    if atomic and fsync:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular_file(path: Path, follow_symlinks: bool = True) -> int:
    """A read-only descriptor of `path`, which must be a regular file; with
    `follow_symlinks=False` a symbolic link is refused instead of followed (O_NOFOLLOW, so
    the check and the open are one step). Raises CheckpointError naming the file."""
    # O_NONBLOCK: opening a FIFO (a crafted "manifest.json") would otherwise wait forever
    # for a writer, before the type check below could refuse it.
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if not follow_symlinks and os.path.islink(path):
            raise CheckpointError(
                f"{path} is a symbolic link (to {os.readlink(path)!r}); files inside a checkpoint must be "
                "regular files, so that a checkpoint cannot make the loader read outside it"
            ) from None
        raise CheckpointError(f"{path}: cannot be opened ({err.strerror or err})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def hash_file(path: Path, fsync: bool = False, follow_symlinks: bool = True) -> tuple[str, int]:
    """`(sha256 hex, size)` of one file."""
    digest, size = hashlib.sha256(), 0
    with os.fdopen(open_regular_file(path, follow_symlinks), "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest(), size


def hash_tree(directory: Path, pool: concurrent.futures.Executor, fsync: bool) -> dict[str, dict[str, Any]]:
    """`{relative path: {sha256, bytes}}` of every file under `directory` (fsynced first,
    with the directory, when `fsync`). Only plain files and directories are expected there
    (this process or its peers just wrote them): anything else is an error."""
    paths = []
    for path in sorted(directory.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise CheckpointError(f"{path}: only regular files may be part of a checkpoint")
        if path.is_file():
            paths.append(path)
    futures = {p.relative_to(directory).as_posix(): pool.submit(hash_file, p, fsync, False) for p in paths}
    if fsync:
        fsync_dir(directory)
    return {rel: dict(zip(("sha256", "bytes"), f.result(), strict=True)) for rel, f in futures.items()}


def verify_tree(directory: Path, listing: Mapping[str, Any], pool: concurrent.futures.Executor | None) -> None:
    """Check that `directory` holds exactly the files `listing` names, as regular files of
    the listed sizes, and (with a `pool`) that each matches its sha256. Nothing inside is
    parsed before this passed: a file that is not listed, a link, a subdirectory or a name
    with a path in it is an error."""
    if directory.is_symlink() or not directory.is_dir():
        raise CheckpointError(f"{directory} is missing (or is not a real directory)")
    if not isinstance(listing, Mapping):
        raise CheckpointError(f"{directory}: the manifest's listing of it is malformed")
    present = {entry.name for entry in os.scandir(directory)}
    unlisted = sorted(present - set(listing))
    if unlisted:
        raise CheckpointError(
            f"{directory} holds files the manifest does not list: {', '.join(map(repr, unlisted[:5]))}"
        )
    checks = {}
    for name, info in listing.items():
        if not is_plain_name(name):
            raise CheckpointError(f"{directory}: the manifest lists a file outside it: {name!r}")
        path = directory / name
        if name not in present:
            raise CheckpointError(f"{path} is missing")
        check_listed_file(path, info)
        if pool is not None:
            checks[name] = (info, pool.submit(hash_file, path, False, False))
    for name, (info, future) in checks.items():
        digest, size = future.result()
        if size != info["bytes"] or digest != info["sha256"]:
            raise CheckpointError(
                f"{directory / name} does not match its sha256 in the manifest (damaged or truncated)"
            )


def check_listed_file(path: Path, info: Any) -> None:
    """`path` must be what the manifest's entry `info` lists: `{"sha256": hex, "bytes": n}`
    well formed, and a regular file (not a link) of that size. The hash is the caller's."""
    if not isinstance(info, Mapping) or not is_count(info.get("bytes")) or not _is_sha256(info.get("sha256")):
        raise CheckpointError(f"{path}: the manifest's entry for it is malformed")
    fd = open_regular_file(path, follow_symlinks=False)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size != info["bytes"]:
        raise CheckpointError(f"{path} has {size} bytes, the manifest says {info['bytes']} (truncated?)")


def is_plain_name(name: Any) -> bool:
    """A file name without a path: no separator, not "." or "..", no NUL."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and name not in (".", "..")
        and not any(c in name for c in "/\\\x00")
    )


def is_count(value: Any) -> bool:
    """An int (not a bool) >= 0: a size, an offset, a counter read from disk."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
