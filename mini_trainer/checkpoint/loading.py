"""Loading checkpoints: verify everything, then parse, then hand over the state.

A checkpoint directory is untrusted input (it may come from another machine, a shared
disk, a download). Before anything in it is parsed: the manifest is read as JSON (never
unpickled), its format, version, checksum and counters are checked, every file it names
must be a plain name inside the directory, a regular file (symbolic links are refused)
of the listed size whose sha256 matches. Safetensors headers are then validated in full,
the JSON skeleton's tags against explicit lists, and each tensor must be referred to
exactly once. A `sharded/` directory (DCP shards) is accepted only when the caller asks
for sharded checkpoints, and only if it holds exactly the files the manifest lists.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .errors import CheckpointError
from .files import (
    check_listed_file,
    is_count,
    is_plain_name,
    open_regular_file,
    verify_tree,
)
from .format import join_state
from .safetensors_io import read_safetensors
from .sharded import check_dcp_metadata
from .writing import (
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    SHARDED_DIR,
    list_checkpoints,
    manifest_checksum,
)

logger = logging.getLogger("mini_trainer")

_MAX_MANIFEST = 256 << 20  # bytes: the skeleton is small; this only stops a crafted giant
#: `check(state)` raises CheckpointError when a loaded state does not fit the trainer.
StateCheck = Callable[[Mapping[str, Any]], None]


class LoadedCheckpoint(NamedTuple):
    """A verified checkpoint: where it is, the state, and (sharded checkpoints only) the
    manifest's listing of its `sharded/` files, which `load_sharded` checks again."""

    path: Path
    state: dict[str, Any]
    sharded_files: Mapping[str, Any] | None = None


def load_checkpoint(
    path: str | os.PathLike, *, sharded: bool = False, verify_directories: bool = True, check: StateCheck | None = None
) -> dict[str, Any]:
    """Load a checkpoint and return the state for `trainer.load_state_dict`.

    `path` is a checkpoint directory (`.../step_000001000`), a run's checkpoint root (its
    newest valid checkpoint is taken, see `find_latest`) or a `.pt`/`.pth` file from
    `torch.save(trainer.state_dict())`, read with `torch.load(weights_only=True)` so that no
    code in it can run. Raises `CheckpointError` when nothing valid is there.
    `sharded=True` accepts checkpoints with DCP shards (`CheckpointingHook(sharded=True)`);
    `verify_directories=False` then skips re-hashing them (another rank has).
    `check(state)` rejects states that do not fit (e.g. `trainer.check_state_dict`).
    """
    return read_checkpoint(path, sharded=sharded, verify_directories=verify_directories, check=check).state


def read_checkpoint(
    path: str | os.PathLike, *, sharded: bool = False, verify_directories: bool = True, check: StateCheck | None = None
) -> LoadedCheckpoint:
    """`load_checkpoint`, returning where the state came from and its sharded listing."""
    path = Path(path)
    if path.is_file():
        loaded = LoadedCheckpoint(path, _load_torch_file(path))
    elif not path.is_dir():
        raise CheckpointError(f"no checkpoint at {str(path)!r}: it does not exist")
    elif (path / MANIFEST).exists() or (path / MANIFEST).is_symlink():
        loaded = _load_directory(path, sharded, verify_directories)
    else:
        found = latest_checkpoint(path, sharded=sharded, check=check)
        if found is None:
            raise CheckpointError(
                f"no checkpoint at {str(path)!r}: no manifest.json and no valid step_* directory inside"
            )
        return found
    if check is not None:
        _check(loaded, check)
    return loaded


def find_latest(
    root: str | os.PathLike, *, sharded: bool = False, check: StateCheck | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `root` that loads, verifies and passes `check`, as
    `(directory, state)`; damaged newer ones are reported with a warning and skipped.
    None when `root` holds no checkpoint; CheckpointError when it holds some but none is
    usable (starting over would mix a new run with the old one's files)."""
    found = latest_checkpoint(root, sharded=sharded, check=check)
    return None if found is None else (found.path, found.state)


def latest_checkpoint(
    root: str | os.PathLike, *, sharded: bool = False, check: StateCheck | None = None
) -> LoadedCheckpoint | None:
    """`find_latest`, returning a `LoadedCheckpoint`."""
    root = Path(root)
    candidates = [directory for _, directory in reversed(list_checkpoints(root))]
    pointer = read_pointer(root, LATEST)
    if pointer is not None and pointer not in candidates and (pointer / MANIFEST).exists():
        candidates.insert(0, pointer)  # a renamed or non-standard checkpoint named by `latest`
    skipped: dict[str, str] = {}
    for directory in candidates:
        try:
            loaded = _load_directory(directory, sharded)
            if check is not None:
                _check(loaded, check)
        except CheckpointError as err:
            logger.warning("checkpoint %s cannot be used: %s", directory, err)
            skipped[directory.name] = str(err)
            continue
        if skipped:
            logger.warning(
                "resuming from %s instead of the newer unusable checkpoint(s) %s", directory, ", ".join(skipped)
            )
        return loaded
    if skipped:
        raise CheckpointError(
            f"{root} holds checkpoints but none of them can be used ({'; '.join(skipped.values())[:2000]}). "
            "Move them away to start a new run there, or resume from another checkpoint"
        )
    return None


def _check(loaded: LoadedCheckpoint, check: StateCheck) -> None:
    try:
        check(loaded.state)
    except CheckpointError as err:
        raise CheckpointError(f"{loaded.path}: {err}") from None


def read_pointer(root: str | os.PathLike, pointer: str = LATEST) -> Path | None:
    """The directory `root/<pointer>` (`latest`, `best`) names, if that is a plain name
    that is not a symbolic link (None otherwise; loading verifies the directory itself)."""
    root = Path(root)
    latest = root / pointer
    try:
        if stat.S_ISLNK(os.lstat(latest).st_mode):
            logger.warning(
                "ignoring %s: it is a symbolic link (to %r), not the file a save writes", latest, os.readlink(latest)
            )
            return None
        with os.fdopen(open_regular_file(latest, follow_symlinks=False), "rb") as f:
            name = f.read(256).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError, CheckpointError):
        return None
    directory = root / name
    if not is_plain_name(name) or directory.is_symlink():
        return None
    return directory


def _load_directory(directory: Path, sharded: bool, verify_directories: bool = True) -> LoadedCheckpoint:
    try:
        return _load_directory_unchecked(directory, sharded, verify_directories)
    except CheckpointError as err:
        if str(directory) in str(err):
            raise
        raise CheckpointError(f"{directory}: {err}") from None
    except Exception as err:  # I/O errors, malformed content: this checkpoint is unusable
        raise CheckpointError(f"{directory}: cannot be loaded ({type(err).__name__}: {err})") from err


def _load_directory_unchecked(directory: Path, sharded: bool, verify_directories: bool) -> LoadedCheckpoint:
    manifest = read_manifest(directory)
    files = manifest["files"]
    for file in files_outside(files):
        raise CheckpointError(
            f"{directory}: {MANIFEST} names a file outside the checkpoint, or malformed: {str(file)[:100]!r}"
        )
    sharded_files = sharded_listing(directory, manifest, sharded)
    with concurrent.futures.ThreadPoolExecutor(max(len(files), 1)) as pool:
        if sharded_files is not None:  # names, sizes, no links (and hashes): before any file is read
            verify_tree(directory / SHARDED_DIR, sharded_files, pool if verify_directories else None)
            check_dcp_metadata(directory / SHARDED_DIR, sharded_files)  # unpickled with DCP's classes only
        futures = {
            file: pool.submit(_read_listed, directory / file, info) for file, info in files.items()
        }
        tensors = {file: future.result() for file, future in futures.items()}
    state = join_state(manifest["state"], tensors)
    mismatch = state_mismatch(state, manifest, sharded_files is not None)
    if mismatch is not None:
        raise CheckpointError(f"{directory}: {mismatch}")
    return LoadedCheckpoint(directory, state, sharded_files)


def files_outside(files: Mapping[str, Any]) -> list[str]:
    """The names a manifest's `files` listing must not have: not a plain name inside the
    checkpoint, hidden, or without a `{sha256, bytes}` entry."""
    return [name for name, info in files.items()
            if not is_plain_name(name) or name.startswith(".") or not isinstance(info, Mapping)]


def state_mismatch(state: Any, manifest: Mapping[str, Any], has_sharded: bool) -> str | None:
    """Why a joined state does not belong to its manifest (another step, or disagreeing on
    `sharded/`), or None."""
    if not isinstance(state, dict) or state.get("step") != manifest["step"]:
        return f"the state's step does not match the manifest's ({manifest['step']})"
    if bool(state.get("sharded")) != has_sharded:
        return f"the state and the manifest disagree on whether it has a {SHARDED_DIR}/ directory"
    return None


def _read_listed(path: Path, info: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    check_listed_file(path, info)
    return read_safetensors(path, info["sha256"], follow_symlinks=False)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The verified manifest of a checkpoint directory (format, checksum, version, counters,
    listings); CheckpointError naming the file otherwise. Nothing it lists is read."""
    path = directory / MANIFEST
    with os.fdopen(open_regular_file(path, follow_symlinks=False), "rb") as f:
        if os.fstat(f.fileno()).st_size > _MAX_MANIFEST:
            raise CheckpointError(f"{path}: larger than {_MAX_MANIFEST >> 20} MiB; not a manifest this library wrote")
        text = f.read()
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("checksum") != manifest_checksum(manifest):
        raise CheckpointError(f"{path} does not match its checksum (the file is damaged)")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: checkpoint format version {manifest.get('version')!r}; "
            f"this mini_trainer reads version {FORMAT_VERSION}"
        )
    for counter in ("step", "epoch"):
        value = manifest.get(counter)
        if not is_count(value) and not (counter == "epoch" and value is None):
            raise CheckpointError(f"{path}: {counter} is {value!r}; it must be an integer >= 0")
    if not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path} lists no files")
    if not isinstance(manifest.get("directories") or {}, dict):
        raise CheckpointError(f"{path}: 'directories' is malformed")
    return manifest


def sharded_listing(directory: Path, manifest: Mapping[str, Any], sharded: bool) -> Mapping[str, Any] | None:
    """The manifest's listing of `sharded/`, when it has one and the caller wants it."""
    directories = manifest.get("directories") or {}
    unknown = sorted(set(directories) - {SHARDED_DIR})
    if unknown:
        raise CheckpointError(
            f"{directory}: {MANIFEST} lists directories this library never writes: "
            f"{', '.join(map(repr, unknown[:5]))}"
        )
    if SHARDED_DIR not in directories:
        return None
    if not sharded:
        raise CheckpointError(
            f"{directory} is a sharded checkpoint (FSDP2 shards in {SHARDED_DIR}/, written with "
            "CheckpointingHook(sharded=True)): resume it with CheckpointingHook(sharded=True)"
        )
    return directories[SHARDED_DIR]


def _load_torch_file(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: we will not load this
        raise CheckpointError(
            f"{path}: refused to load with torch.load(weights_only=True): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__} "
            "(files that need arbitrary unpickling are never loaded: they could run code)"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a trainer state dict")
    if state.get("sharded"):
        raise CheckpointError(f"{path}: a state dict of sharded tensors cannot be resumed from a single file")
    return state
