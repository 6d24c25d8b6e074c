"""Checkpoints on disk: safetensors for tensors, JSON for everything else, no pickle.

    <root>/step_000001000/
        model.safetensors      the model's state dict; plain `safetensors.torch.load_file` reads it
        optimizer.safetensors  every other tensor of the training state (optimizer, scaler,
                               RNG, data loader, hooks), keyed by its dotted path
        ema.safetensors        the EMA weights, when an `EmaHook` is present
        manifest.json          format version, step, epoch, sha256 and size of each file, and
                               the non-tensor state with a reference where each tensor goes
        sharded/               FSDP2 sharded state (`CheckpointingHook(sharded=True)`): the
                               model and optimizer as `torch.distributed.checkpoint` wrote
                               them, one file per rank, hashed in the manifest like the rest
    <root>/latest              one line: the name of the newest complete checkpoint

Crash safety comes from the order of writes: everything goes into a temporary sibling
directory, each file is fsynced, then the directory is fsynced and `os.replace`d into place,
and only then is `latest` rewritten (write-temporary, fsync, `os.replace`). A process killed
at any instant leaves at worst a stray temporary directory; every `step_*` directory that
exists is complete. Loading re-hashes every file, so a damaged or truncated checkpoint is
detected, reported and skipped for the previous one (`find_latest`).

The writer streams each tensor's memory straight to the file while a second thread hashes
the same bytes, and files are written in parallel; reading does the same in reverse. A
durable save then costs about a plain `safetensors.torch.save_file`, plus an fsync, plus one
sha256 pass (~1.4 GB/s per core); `StagingBuffers` lets `CheckpointingHook(async_save=True)`
take that off the training loop's path (`benchmarks/checkpoint_io.py` measures all of it).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "split_state",
    "join_state",
    "write_safetensors",
    "read_safetensors",
    "PreparedCheckpoint",
    "StagingBuffers",
    "prepare_checkpoint",
    "save_checkpoint",
    "write_checkpoint",
    "write_file",
    "load_checkpoint",
    "list_checkpoints",
    "find_latest",
    "prune_checkpoints",
    "checkpoint_name",
    "new_temporary",
    "SHARDED_DIR",
]

logger = logging.getLogger("mini_trainer")

FORMAT = "mini_trainer.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
DEFAULT_FILE = "optimizer.safetensors"
#: Where tensors go, by dotted prefix of their path in the state; the rest go to DEFAULT_FILE.
DEFAULT_FILES = {"model": MODEL_FILE}
SHARDED_DIR = "sharded"

_STEP_DIR = re.compile(r"^step_(\d+)(\.replaced-[0-9a-f]+)?$")
_OWN_STORAGE_BELOW = 64 << 10  # bytes: smaller tensors are copied out of the file buffer
_CHUNK = 64 << 20  # bytes per read/hash unit: big enough that syscalls and GIL hand-offs vanish

# The safetensors dtype names (https://github.com/huggingface/safetensors, format section).
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or not in a format we load."""


# =========================================================================== state <-> files


def split_state(
    state: Any, files: Mapping[str, str] | None = None, default_file: str = DEFAULT_FILE
) -> tuple[Any, dict[str, dict[str, torch.Tensor]]]:
    """Split nested `state` into a JSON-able skeleton and `{file: {key: tensor}}`.

    `files` maps a dotted path prefix (e.g. "model", "hooks.ema.weights") to the file its
    tensors go to, keyed relative to the prefix (so model.safetensors holds the usual
    parameter names); every other tensor goes to `default_file` under its full dotted path.
    Dicts (any key type), lists, tuples, `torch.Size`, numbers (NaN/inf included), strings,
    None, dtypes, devices and numpy arrays/scalars are kept exactly; anything else is an
    error naming its path, since the alternative would be pickling it.
    """
    routes = sorted(((tuple(prefix.split(".")), name) for prefix, name in {**DEFAULT_FILES, **(files or {})}.items()), key=lambda r: -len(r[0]))
    tensors: dict[str, dict[str, torch.Tensor]] = {}

    def store(tensor: torch.Tensor, path: tuple[str, ...]) -> dict[str, Any]:
        file, key_path = default_file, path
        for prefix, name in routes:
            if path[: len(prefix)] == prefix:
                file, key_path = name, path[len(prefix):]
                break
        bucket = tensors.setdefault(file, {})
        key = base = ".".join(key_path) or "tensor"
        n = 1
        while key in bucket:  # a dotted key can repeat ("a.b" under "a" vs key "a.b")
            key, n = f"{base}#{n}", n + 1
        bucket[key] = tensor.detach()
        return {"$tensor": [file, key]}

    numpy = sys.modules.get("numpy")

    def encode(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, torch.Tensor):
            return store(value, path)
        if numpy is not None and isinstance(value, numpy.generic):  # before float: np.float64 is a float
            return {"$numpy": [value.dtype.str, encode(value.item(), path)]}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$float": repr(float(value))}
        if isinstance(value, Mapping):
            keys_plain = all(isinstance(k, str) and not k.startswith("$") for k in value)
            if keys_plain:
                return {k: encode(v, (*path, k)) for k, v in value.items()}
            return {"$dict": [[encode(k, path), encode(v, (*path, str(k)))] for k, v in value.items()]}
        if isinstance(value, torch.Size):
            return {"$size": list(value)}
        if type(value) is tuple:
            return {"$tuple": [encode(v, (*path, str(i))) for i, v in enumerate(value)]}
        if type(value) is list:
            return [encode(v, (*path, str(i))) for i, v in enumerate(value)]
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if numpy is not None and isinstance(value, numpy.ndarray):
            return {"$ndarray": store(torch.from_numpy(value.copy()), path)["$tensor"]}
        where = ".".join(path) or "<root>"
        raise TypeError(
            f"cannot checkpoint {type(value).__module__}.{type(value).__qualname__} at state path {where!r}: "
            "checkpoints hold tensors, numbers, strings, None, dtypes, devices, numpy arrays and "
            "dicts/lists/tuples of them (nothing is pickled); convert it in your state_dict()"
        )

    return encode(state, ()), tensors


def join_state(skeleton: Any, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> Any:
    """Inverse of `split_state`: the original nested state."""

    def tensor(ref: list[str]) -> torch.Tensor:
        file, key = ref
        try:
            return tensors[file][key]
        except KeyError:
            raise CheckpointError(f"the manifest refers to tensor {key!r} in {file}, which is not there") from None

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (tag, body), = value.items()
            if tag == "$tensor":
                return tensor(body)
            if tag == "$float":
                return float(body)
            if tag == "$dict":
                return {decode(k): decode(v) for k, v in body}
            if tag == "$tuple":
                return tuple(decode(v) for v in body)
            if tag == "$size":
                return torch.Size(body)
            if tag == "$dtype":
                return getattr(torch, body)
            if tag == "$device":
                return torch.device(body)
            if tag == "$ndarray":
                return tensor(body).numpy()
            if tag == "$numpy":
                import numpy

                return numpy.dtype(body[0]).type(decode(body[1]))
        return {k: decode(v) for k, v in value.items()}

    return decode(skeleton)


# =========================================================================== safetensors files


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, fsync: bool = True
) -> tuple[str, int]:
    """Write `tensors` as a safetensors file and return `(sha256 hex, size in bytes)`.

    Tensor memory goes to the file without an intermediate copy, and a second thread hashes
    the same bytes meanwhile. The layout follows the safetensors format (8-byte header
    length, JSON header padded to 8 bytes, then the data, largest element size first so
    every tensor is aligned), so any safetensors reader loads it.
    """
    if sys.byteorder != "little":  # pragma: no cover - no big-endian machines to test on
        raise CheckpointError("writing safetensors needs a little-endian machine")
    entries = []
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"write_safetensors: {key!r} is a {type(value).__name__}, not a tensor")
        if value.dtype not in _DTYPE_NAMES:
            raise TypeError(f"write_safetensors: tensor {key!r} has dtype {value.dtype}, which safetensors cannot store")
        entries.append((key, value))
    entries.sort(key=lambda e: (-e[1].element_size(), e[0]))

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, value in entries:
        nbytes = value.numel() * value.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[value.dtype], "shape": list(value.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    prefix = len(header_bytes).to_bytes(8, "little") + header_bytes

    digest = hashlib.sha256(prefix)
    with open(path, "wb", buffering=0) as f, concurrent.futures.ThreadPoolExecutor(1) as hasher:
        _write_all(f, memoryview(prefix))
        pending = []
        for _, value in entries:
            data = _bytes_view(value)
            if data is None:
                continue
            pending.append(hasher.submit(digest.update, data))  # runs while we write the same bytes
            _write_all(f, data)
        if fsync:
            os.fsync(f.fileno())  # waits for the disk while the hasher catches up
        for future in pending:
            future.result()
    return digest.hexdigest(), len(prefix) + offset


def _bytes_view(tensor: torch.Tensor) -> memoryview | None:
    """The tensor's bytes as a read-only view on CPU memory (copied only when needed)."""
    if tensor.numel() == 0:
        return None
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    tensor = tensor.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(tensor.numpy()).cast("B")


def _write_all(f: Any, data: memoryview) -> None:
    while data:
        written = f.write(data)
        data = data[written:]


def read_safetensors(path: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file into memory (checking its sha256 when given) and return
    CPU tensors that are views of one buffer (no copy per tensor)."""
    path = Path(path)
    size = path.stat().st_size
    buffer = torch.empty(size, dtype=torch.uint8)  # unlike bytearray(size), not zero-filled first
    view = memoryview(buffer.numpy())
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f, concurrent.futures.ThreadPoolExecutor(1) as hasher:
        pending = []
        done = 0
        while done < size:
            got = f.readinto(view[done : done + _CHUNK])
            if not got:
                break
            pending.append(hasher.submit(digest.update, view[done : done + got]))  # hash while reading on
            done += got
        for future in pending:
            future.result()
    if done != size:
        raise CheckpointError(f"{path}: the file shrank while it was read ({done} of {size} bytes)")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise CheckpointError(f"{path}: sha256 does not match the manifest (the file is damaged or was not completely written)")
    return _parse_safetensors(path, buffer)


def _parse_safetensors(path: Path, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    size = buffer.numel()
    if size < 8:
        raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
    raw = buffer.numpy()
    header_len = int.from_bytes(raw[:8].tobytes(), "little")
    if header_len > size - 8:
        raise CheckpointError(f"{path}: truncated (header of {header_len} bytes in a file of {size})")
    try:
        header = json.loads(raw[8 : 8 + header_len].tobytes())
    except ValueError as err:
        raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from None
    data_start = 8 + header_len
    tensors: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _DTYPES_BY_NAME[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed header entry for {key!r}: {info!r}") from None
        numel = math.prod(shape)
        if end - begin != numel * dtype.itemsize or begin < 0 or data_start + end > size:
            raise CheckpointError(f"{path}: tensor {key!r} does not fit the file (offsets {begin}..{end})")
        data = buffer[data_start + begin : data_start + end]
        if numel == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
        elif end - begin > _OWN_STORAGE_BELOW and (data_start + begin) % dtype.itemsize == 0:
            tensors[key] = data.view(dtype).view(shape)  # a view into the file's buffer: no copy
        else:
            # Small tensors get storage of their own: some consumers (RNG generators'
            # set_state) read a tensor's storage from its start, ignoring a view's offset.
            tensors[key] = data.clone().view(dtype).view(shape)
    return tensors


# =========================================================================== checkpoints


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


class PreparedCheckpoint:
    """A state split for writing (`prepare_checkpoint`): the JSON skeleton plus the tensors
    of each file. Nothing in it refers back to the live state except the tensors."""

    def __init__(
        self, skeleton: Any, tensors: dict[str, dict[str, torch.Tensor]], step: int, epoch: Any, directories: tuple[str, ...] = ()
    ) -> None:
        self.skeleton = skeleton
        self.tensors = tensors
        self.step = step
        self.epoch = epoch
        #: subdirectories that others already wrote into the temporary directory (DCP shards)
        self.directories = directories


def prepare_checkpoint(state: Mapping[str, Any], files: Mapping[str, str] | None = None) -> PreparedCheckpoint:
    """Split a `trainer.state_dict()` for `write_checkpoint` (see `split_state` for `files`)."""
    if not isinstance(state, Mapping) or not isinstance(state.get("step"), int):
        raise TypeError("a checkpoint needs a trainer state_dict() with an integer 'step'")
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
        return PreparedCheckpoint(prepared.skeleton, staged, prepared.step, prepared.epoch, prepared.directories)


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
    directory from `new_temporary` that already holds `prepared.directories`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = name or checkpoint_name(prepared.step)
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
            directories = {d: _hash_tree(temporary / d, pool, fsync) for d in prepared.directories}
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": prepared.step,
            "epoch": prepared.epoch,
            "created": time.time(),
            "files": {file: {"sha256": digest, "bytes": size} for file, (digest, size) in sorted(written.items())},
            "directories": directories,
            "state": prepared.skeleton,
        }
        manifest["checksum"] = _manifest_checksum(manifest)  # the manifest is checked too, not just the files
        write_file(temporary / MANIFEST, json.dumps(manifest, indent=1, allow_nan=False), fsync=fsync)
        if fsync:
            _fsync_dir(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    final = root / name
    displaced = None
    if final.exists():
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
        _fsync_dir(root)
    write_file(root / LATEST, name + "\n", fsync=fsync, atomic=True)
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)
    return final


def _hash_tree(directory: Path, pool: concurrent.futures.Executor, fsync: bool) -> dict[str, dict[str, Any]]:
    """`{relative path: {sha256, bytes}}` of every file under `directory` (fsynced first,
    with the directory, when `fsync`)."""
    paths = sorted(p for p in directory.rglob("*") if p.is_file())
    futures = {p.relative_to(directory).as_posix(): pool.submit(_hash_file, p, fsync) for p in paths}
    if fsync:
        _fsync_dir(directory)
    return {rel: dict(zip(("sha256", "bytes"), f.result())) for rel, f in futures.items()}


def _hash_file(path: Path, fsync: bool) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest(), size


def _manifest_checksum(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def write_file(path: Path, data: str | bytes, *, fsync: bool, atomic: bool = False) -> None:
    """Write `data` (text as UTF-8) to `path`. `atomic`: through a temporary file in the same
    directory renamed into place, so a reader (or a process killed mid-write) sees the old
    file or the whole new one, and a failed write leaves no temporary behind. `fsync`: on
    disk before returning (and the rename too), so it also survives a power loss."""
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
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, *, verify_directories: bool = True) -> dict[str, Any]:
    """Load a checkpoint and return the state for `trainer.load_state_dict`.

    `path` is a checkpoint directory (`.../step_000001000`), a run's checkpoint root (its
    newest valid checkpoint is taken, see `find_latest`) or a `.pt`/`.pth` file from
    `torch.save(trainer.state_dict())`, read with `torch.load(weights_only=True)` so that no
    code in it can run. Raises `CheckpointError` when nothing valid is there.
    `verify_directories=False` skips re-hashing sharded subdirectories (DCP shards) that
    another rank has verified; the safetensors files are always checked.
    """
    path = Path(path)
    if path.is_file():
        return _load_torch_file(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {str(path)!r}: it does not exist")
    if (path / MANIFEST).exists():
        return _load_directory(path, verify_directories)
    found = find_latest(path)
    if found is None:
        raise CheckpointError(f"no checkpoint at {str(path)!r}: no manifest.json and no valid step_* directory inside")
    return found[1]


def _load_directory(directory: Path, verify_directories: bool = True) -> dict[str, Any]:
    try:
        return _load_directory_unchecked(directory, verify_directories)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - I/O errors, malformed content: this checkpoint is unusable
        raise CheckpointError(f"{directory}: cannot be loaded ({type(err).__name__}: {err})") from err


def _load_directory_unchecked(directory: Path, verify_directories: bool = True) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory}: unreadable {MANIFEST} ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: {MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise CheckpointError(f"{directory}: {MANIFEST} does not match its checksum (the file is damaged)")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: checkpoint format version {manifest.get('version')!r}; this mini_trainer reads version {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{directory}: {MANIFEST} lists no files")
    for file, info in files.items():
        if "/" in file or "\\" in file or file.startswith("."):
            raise CheckpointError(f"{directory}: {MANIFEST} names a file outside the checkpoint: {file!r}")
        actual = directory / file
        if not actual.is_file():
            raise CheckpointError(f"{directory}: {file} is missing")
        if actual.stat().st_size != info.get("bytes"):
            raise CheckpointError(f"{directory}: {file} has {actual.stat().st_size} bytes, the manifest says {info.get('bytes')} (truncated?)")
    directories = (manifest.get("directories") or {}) if verify_directories else {}
    with concurrent.futures.ThreadPoolExecutor(max(len(files), 1)) as pool:
        futures = {file: pool.submit(read_safetensors, directory / file, info.get("sha256") or "") for file, info in files.items()}
        tensors = {file: future.result() for file, future in futures.items()}
        for sub, listing in directories.items():
            _verify_tree(directory, sub, listing, pool)
    return join_state(manifest["state"], tensors)


def _verify_tree(directory: Path, sub: str, listing: Mapping[str, Any], pool: concurrent.futures.Executor) -> None:
    """Check the files a manifest lists under `directory/sub` (e.g. DCP shards) by hash."""
    if "/" in sub or sub.startswith(".") or not (directory / sub).is_dir():
        raise CheckpointError(f"{directory}: {sub}/ is missing")
    checks = {}
    for rel, info in listing.items():
        path = directory / sub / rel
        if ".." in Path(rel).parts or rel.startswith("/") or not path.is_file():
            raise CheckpointError(f"{directory}: {sub}/{rel} is missing")
        checks[rel] = (info, pool.submit(_hash_file, path, False))
    for rel, (info, future) in checks.items():
        digest, size = future.result()
        if size != info.get("bytes") or digest != info.get("sha256"):
            raise CheckpointError(f"{directory}: {sub}/{rel} does not match its sha256 in the manifest (damaged or truncated)")


def _load_torch_file(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: we will not load this
        raise CheckpointError(
            f"{path}: refused to load with torch.load(weights_only=True): {str(err).splitlines()[0]} "
            "(files that need arbitrary unpickling are never loaded: they could run code)"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a trainer state dict")
    return state


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """`(step, directory)` of every `step_*` directory in `root`, oldest first (complete or
    not: `find_latest` checks them), including copies displaced by a re-save of the same
    step (`step_N.replaced-*`)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            # A displaced copy (`step_N.replaced-*`, left by a kill while step N was saved
            # again) sorts just before `step_N`, so the exact name is tried first.
            found.append((int(match.group(1)), match.group(2) is None, entry))
    return [(step, entry) for step, _, entry in sorted(found)]


def find_latest(root: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `root` that loads and verifies, with its state; damaged
    newer ones are reported with a warning and skipped. None when there is none."""
    root = Path(root)
    candidates = [directory for _, directory in reversed(list_checkpoints(root))]
    pointer = _read_latest(root)
    if pointer is not None and pointer not in candidates and (pointer / MANIFEST).exists():
        candidates.insert(0, pointer)  # a renamed or non-standard checkpoint named by `latest`
    skipped = []
    for directory in candidates:
        try:
            state = _load_directory(directory)
        except CheckpointError as err:
            logger.warning("checkpoint %s cannot be used: %s", directory, err)
            skipped.append(directory.name)
            continue
        if skipped:
            logger.warning("resuming from %s instead of the newer damaged checkpoint(s) %s", directory, ", ".join(skipped))
        return directory, state
    return None


def _read_latest(root: Path) -> Path | None:
    try:
        name = (root / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not name or "/" in name or name.startswith("."):
        return None
    return root / name


def prune_checkpoints(root: str | os.PathLike, keep_last: int, keep_interval: int | None = None, protect: Iterable[Path] = ()) -> list[Path]:
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
        if directory in keep:
            continue
        trash = directory.with_name(f".trash-{directory.name}-{secrets.token_hex(4)}")
        os.replace(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(directory)
    return deleted


def remove_temporaries(root: str | os.PathLike, keep: Path | None = None) -> None:
    """Remove what killed writers left behind (`.tmp-*`, `.trash-*`, `.latest.tmp-*`),
    except `keep` (the one being assembled now)."""
    root = Path(root)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if keep is not None and entry == keep:
            continue
        if entry.name.startswith((".tmp-", ".trash-", f".{LATEST}.tmp-")):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
