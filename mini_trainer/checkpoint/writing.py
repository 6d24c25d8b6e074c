"""Writing checkpoint directories atomically, and removing old ones.

Everything goes into a temporary sibling directory, each file is fsynced, then the
directory is fsynced and `os.replace`d into place, and only then is `latest` rewritten
(write-temporary, fsync, `os.replace`). A process killed at any instant leaves at worst a
stray temporary; every `step_*` directory that exists is complete.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .files import fsync_dir, hash_tree, is_count, write_file
from .format import MODEL_FILE, split_state
from .safetensors_io import write_safetensors

FORMAT = "mini_trainer.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
BEST = "best"  # names the best checkpoint by an evaluation result (CheckpointingHook(keep_best=...))
SHARDED_DIR = "sharded"
STEP_DIR = re.compile(r"^step_(\d+)(\.replaced-[0-9a-f]+)?$")
# What writers leave while they work: `.tmp-<name>-<pid>-<hex>` (a checkpoint being
# assembled) and `.latest.tmp-<pid>-<hex>` / `.best.tmp-...`, owned by the process `pid`;
# `.trash-*` (a checkpoint being deleted) belongs to nobody.
TEMPORARY = re.compile(r"^\.(tmp-.+|latest\.tmp|best\.tmp)-(\d{1,10})-[0-9a-f]+$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """The sha256 of a manifest without its own "checksum" entry (catches damage, not
    forgery: anyone can recompute it)."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


class PreparedCheckpoint:
    """A state split for writing (`prepare_checkpoint`): the JSON skeleton plus the tensors
    of each file. Nothing in it refers back to the live state except the tensors."""

    def __init__(
        self,
        skeleton: Any,
        tensors: dict[str, dict[str, torch.Tensor]],
        step: int,
        epoch: Any,
        directories: tuple[str, ...] = (),
    ) -> None:
        #: extra manifest entries, e.g. {"metrics": {...}, "best": {...}} (JSON-safe values)
        self.manifest_extra: dict[str, Any] = {}
        self.skeleton = skeleton
        self.tensors = tensors
        self.step = step
        self.epoch = epoch
        #: subdirectories that others already wrote into the temporary directory (DCP shards)
        self.directories = directories


def prepare_checkpoint(state: Mapping[str, Any], files: Mapping[str, str] | None = None) -> PreparedCheckpoint:
    """Split a `trainer.state_dict()` for `write_checkpoint` (see `split_state` for `files`)."""
    if not isinstance(state, Mapping) or not is_count(state.get("step")):
        raise TypeError("a checkpoint needs a trainer state_dict() with an integer 'step' >= 0")
    skeleton, by_file = split_state(state, files)
    by_file.setdefault(MODEL_FILE, {})  # always present, even for a model without tensors
    return PreparedCheckpoint(skeleton, by_file, state["step"], state.get("epoch"))


class StagingBuffers:
    """CPU copies of a checkpoint's tensors, so that a background thread can write them
    while training goes on changing the originals. The buffers are kept and reused from
    one save to the next (pinned when the source is on CUDA): after the first save, a
    snapshot is one memcpy (or device-to-host copy) per tensor, without allocations."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}

    def stage(self, prepared: PreparedCheckpoint) -> PreparedCheckpoint:
        staged: dict[str, dict[str, torch.Tensor]] = {}
        used: dict[tuple[str, str], torch.Tensor] = {}
        cuda_devices: set[torch.device] = set()
        for file, tensors in prepared.tensors.items():
            staged[file] = {}
            for key, tensor in tensors.items():
                buffer = self._buffers.get((file, key))
                if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                    buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
                buffer.copy_(tensor, non_blocking=tensor.is_cuda)
                if tensor.is_cuda:
                    cuda_devices.add(tensor.device)
                staged[file][key] = used[(file, key)] = buffer
        for device in cuda_devices:
            torch.cuda.synchronize(device)  # the copies must have landed before another thread reads them
        self._buffers = used  # tensors that are gone (e.g. a removed hook) free their buffers
        copy = PreparedCheckpoint(prepared.skeleton, staged, prepared.step, prepared.epoch, prepared.directories)
        copy.manifest_extra = dict(prepared.manifest_extra)  # the step's metrics and best entry go along
        return copy


def save_checkpoint(
    state: Mapping[str, Any],
    root: str | os.PathLike,
    *,
    files: Mapping[str, str] | None = None,
    name: str | None = None,
    fsync: bool = True,
) -> Path:
    """Write `state` (a `trainer.state_dict()`) to `root/step_<step>` atomically and point
    `root/latest` at it. `files` routes more tensors to files of their own (see
    `split_state`). Returns the checkpoint directory."""
    return write_checkpoint(prepare_checkpoint(state, files), root, name=name, fsync=fsync)


def new_temporary(root: str | os.PathLike, step: int) -> Path:
    """A fresh hidden directory in `root` to assemble checkpoint `step` in: ranks write
    their shards into it before `write_checkpoint(..., temporary=)` completes it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}-{secrets.token_hex(4)}"
    temporary.mkdir()
    return temporary


def write_checkpoint(
    prepared: PreparedCheckpoint,
    root: str | os.PathLike,
    *,
    name: str | None = None,
    fsync: bool = True,
    temporary: Path | None = None,
) -> Path:
    """Write a `prepare_checkpoint` result (see `save_checkpoint`). `temporary` is a
    directory from `new_temporary` that already holds `prepared.directories`. An OSError
    (a full disk, a quota) names the checkpoint it was writing."""
    root = Path(root)
    name = name or checkpoint_name(prepared.step)
    try:
        return _write_checkpoint(prepared, root, name, fsync, temporary)
    except OSError as err:
        if str(root) in str(err):
            raise
        raise OSError(err.errno, f"{err.strerror or err} (while writing checkpoint {root / name})") from err


def _write_checkpoint(prepared: PreparedCheckpoint, root: Path, name: str, fsync: bool, temporary: Path | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if temporary is None:
        temporary = new_temporary(root, prepared.step)
    try:
        metadata = {"format": "pt"}  # what other safetensors tools look for
        with concurrent.futures.ThreadPoolExecutor(len(prepared.tensors)) as pool:
            futures = {
                file: pool.submit(write_safetensors, temporary / file, tensors, metadata, fsync=fsync)
                for file, tensors in prepared.tensors.items()
            }
            written = {file: future.result() for file, future in futures.items()}
            directories = {d: hash_tree(temporary / d, pool, fsync) for d in prepared.directories}
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": prepared.step,
            "epoch": prepared.epoch,
            "created": time.time(),
            "files": {file: {"sha256": digest, "bytes": size} for file, (digest, size) in sorted(written.items())},
            "directories": directories,
            "state": prepared.skeleton,
            **prepared.manifest_extra,
        }
        manifest["checksum"] = manifest_checksum(manifest)  # the manifest is checked too, not just the files
        write_file(temporary / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False), fsync=fsync)
        if fsync:
            fsync_dir(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    final = root / name
    displaced = None
    if final.exists() or final.is_symlink():
        # Saving a step that is already there (a resume that fell back past a damaged
        # checkpoint, a manual save): move the old one aside under a name that loading
        # still finds, so a kill between the two renames loses neither.
        displaced = root / f"{name}.replaced-{secrets.token_hex(4)}"
        os.replace(final, displaced)
    try:
        os.replace(temporary, final)
    except BaseException:
        if displaced is not None and not final.exists():
            os.replace(displaced, final)
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if fsync:
        fsync_dir(root)
    write_file(root / LATEST, name + "\n", fsync=fsync, atomic=True)
    if displaced is not None:
        _remove(displaced)
    return final


def write_pointer(root: str | os.PathLike, pointer: str, checkpoint: Path | None, *, fsync: bool = True) -> None:
    """Point `root/<pointer>` (`LATEST`, `BEST`) at `checkpoint` atomically (None removes it)."""
    path = Path(root) / pointer
    if checkpoint is None:
        path.unlink(missing_ok=True)
        return
    write_file(path, checkpoint.name + "\n", fsync=fsync, atomic=True)


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """`(step, directory)` of every `step_*` directory in `root`, oldest first (complete or
    not: loading checks them), including copies displaced by a re-save of the same step
    (`step_N.replaced-*`). Symbolic links are not checkpoints: a link could make the
    loader read, and pruning delete, outside `root`."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in os.scandir(root):
        match = STEP_DIR.match(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            # A displaced copy (`step_N.replaced-*`, left by a kill while step N was saved
            # again) sorts just before `step_N`, so the exact name is tried first.
            found.append((int(match.group(1)), match.group(2) is None, Path(entry.path)))
    return [(step, entry) for step, _, entry in sorted(found)]


def prune_checkpoints(
    root: str | os.PathLike, keep_last: int, keep_interval: int | None = None, protect: Iterable[Path] = ()
) -> list[Path]:
    """Delete `step_*` checkpoints except the newest `keep_last`, those whose step is a
    multiple of `keep_interval`, and `protect`. Each is first renamed to a hidden name so
    a crash mid-delete never leaves a half-deleted directory that looks like a checkpoint.
    Returns the deleted directories."""
    checkpoints = list_checkpoints(root)
    exact = {directory.name for _, directory in checkpoints}
    # A displaced copy whose step was saved again in full is not a checkpoint of its own.
    superseded = [d for _, d in checkpoints if ".replaced-" in d.name and d.name.split(".")[0] in exact]
    checkpoints = [(step, d) for step, d in checkpoints if d not in superseded]
    keep = {directory for _, directory in checkpoints[-keep_last:]} if keep_last > 0 else set()
    keep.update(Path(p) for p in protect)
    if keep_interval:
        keep.update(directory for step, directory in checkpoints if step % keep_interval == 0)
    deleted = []
    for directory in [*superseded, *(d for _, d in checkpoints)]:
        if directory not in keep:
            _remove(directory)
            deleted.append(directory)
    return deleted


def _remove(directory: Path) -> None:
    trash = directory.with_name(f".trash-{directory.name}-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_temporaries(root: str | os.PathLike, keep: Path | None = None) -> None:
    """Remove what killed writers left behind (`.tmp-*`, `.trash-*`, `.latest.tmp-*`),
    except `keep` (the one being assembled now) and those of a process that is still alive
    on this machine (another writer that holds no lock, e.g. a direct `save_checkpoint`)."""
    root = Path(root)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if keep is not None and entry == keep:
            continue
        match = TEMPORARY.match(entry.name)
        if match is None and not entry.name.startswith(".trash-"):
            continue
        owner = int(match.group(2)) if match is not None else None
        if owner is not None and owner != os.getpid() and _alive(owner):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as err:  # EPERM: it exists, owned by someone else
        return err.errno == errno.EPERM
    return True
