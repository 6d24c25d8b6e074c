"""Safetensors files, written and read without intermediate copies and hashed on the way.

Reading validates the whole header before any tensor is made: a header that is not a JSON
object of well-formed entries, a dtype outside the format's list, negative sizes, offsets
that overlap, leave holes or run past the file, all raise CheckpointError naming the file
and what is wrong (the format's own rule: the data is indexed entirely, without holes).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .files import CHUNK, is_count, open_regular_file

_OWN_STORAGE_BELOW = 64 << 10  # bytes: smaller tensors are copied out of the file buffer
_MAX_HEADER = 100_000_000  # bytes: the limit the reference implementation sets

# The safetensors dtype names (https://github.com/huggingface/safetensors, format section).
SAFETENSORS_DTYPES = {
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
_DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = True,
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
        if value.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(
                f"write_safetensors: tensor {key!r} has dtype {value.dtype}, which safetensors cannot store"
            )
        entries.append((key, value))
    entries.sort(key=lambda e: (-e[1].element_size(), e[0]))

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for key, value in entries:
        nbytes = value.numel() * value.element_size()
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[value.dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + nbytes],
        }
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


def read_safetensors(
    path: str | os.PathLike, sha256: str | None = None, *, follow_symlinks: bool = True
) -> dict[str, torch.Tensor]:
    """Read a safetensors file into memory (checking its sha256 when given) and return
    CPU tensors that are views of one buffer (no copy per tensor). Any malformed file is
    a CheckpointError naming the file and the fault. `follow_symlinks=False` refuses a
    file that is a symbolic link (how checkpoints are read)."""
    path = Path(path)
    with os.fdopen(open_regular_file(path, follow_symlinks), "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buffer = torch.empty(size, dtype=torch.uint8)  # unlike bytearray(size), not zero-filled first
        view = memoryview(buffer.numpy())
        digest = hashlib.sha256()
        with concurrent.futures.ThreadPoolExecutor(1) as hasher:
            pending = []
            done = 0
            while done < size:
                got = f.readinto(view[done : done + CHUNK])
                if not got:
                    break
                pending.append(hasher.submit(digest.update, view[done : done + got]))  # hash while reading on
                done += got
            for future in pending:
                future.result()
    if done != size:
        raise CheckpointError(f"{path}: the file shrank while it was read ({done} of {size} bytes)")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise CheckpointError(
            f"{path}: sha256 does not match the manifest (the file is damaged or was not completely written)"
        )
    return _parse_safetensors(path, buffer)


def _parse_safetensors(path: Path, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    size = buffer.numel()
    raw = buffer.numpy()
    header_len = _header_length(path, raw[:8].tobytes(), size)
    header = _parse_header(path, raw[8 : 8 + header_len].tobytes())
    data_start = 8 + header_len
    entries = _data_layout(path, header, data_start, size)
    tensors: dict[str, torch.Tensor] = {}
    for key, dtype, shape, begin, end in entries:
        data = buffer[data_start + begin : data_start + end]
        if begin == end:
            tensors[key] = torch.empty(shape, dtype=dtype)
        elif end - begin > _OWN_STORAGE_BELOW and (data_start + begin) % dtype.itemsize == 0:
            tensors[key] = data.view(dtype).view(shape)  # a view into the file's buffer: no copy
        else:
            # Small tensors get storage of their own: some consumers (RNG generators'
            # set_state) read a tensor's storage from its start, ignoring a view's offset.
            tensors[key] = data.clone().view(dtype).view(shape)
    return tensors


def _parse_header(path: Path, text: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
        return dict(pairs)

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(
            f"{path}: unreadable safetensors header ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a {type(header).__name__}, not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    return header


def _check_entry(path: Path, key: str, info: Any) -> tuple[str, torch.dtype, list[int], int, int]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: header entry {key[:200]!r}: {what}")

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"must be an object with dtype, shape and data_offsets; got {str(info)[:200]}")
    dtype = _DTYPES_BY_NAME.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise bad(f"dtype {str(info['dtype'])[:40]!r} is not one of {', '.join(_DTYPES_BY_NAME)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise bad(f"shape {str(shape)[:200]} is not a list of sizes >= 0")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(is_count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise bad(f"data_offsets {str(offsets)[:200]} are not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise bad(
            f"shape {shape} of {info['dtype']} needs {math.prod(shape) * dtype.itemsize} bytes, "
            f"data_offsets give {end - begin}"
        )
    return key, dtype, shape, begin, end


def read_safetensors_header(
    path: str | os.PathLike, *, follow_symlinks: bool = True
) -> tuple[dict[str, tuple[torch.dtype, list[int]]], dict[str, str]]:
    """`({key: (dtype, shape)}, __metadata__)` of a safetensors file, validated as
    `read_safetensors` validates it (entries, dtypes, offsets that cover the data exactly and
    end where the file ends) but without reading the tensor data or hashing the file: for
    describing a file cheaply. Keys are in the order of their data in the file."""
    path = Path(path)
    with os.fdopen(open_regular_file(path, follow_symlinks), "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        header_len = _header_length(path, f.read(8), size)
        text = f.read(header_len)
    if len(text) != header_len:
        raise CheckpointError(f"{path}: the file shrank while its header was read")
    header = _parse_header(path, text)
    entries = _data_layout(path, header, 8 + header_len, size)
    return {key: (dtype, shape) for key, dtype, shape, _, _ in entries}, dict(header.get("__metadata__", {}))


def _header_length(path: Path, prefix: bytes, size: int) -> int:
    """The header length a file of `size` bytes starts with (`prefix`: its first 8 bytes)."""
    if size < 8 or len(prefix) < 8:
        raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
    header_len = int.from_bytes(prefix, "little")
    if header_len > min(size - 8, _MAX_HEADER):
        raise CheckpointError(
            f"{path}: truncated or not safetensors (a header of {header_len} bytes in a file of {size})"
        )
    return header_len


def _data_layout(path: Path, header: Mapping[str, Any], data_start: int, size: int) -> list[tuple]:
    """The header's entries `(key, dtype, shape, begin, end)` in the order of their data, which
    must be indexed entirely: each tensor starts where the previous one ended, the last one
    where the file ends."""
    entries = sorted(
        (_check_entry(path, key, info) for key, info in header.items() if key != "__metadata__"),
        key=lambda e: (e[3], e[4]),
    )
    expected = 0
    for key, _, _, begin, end in entries:
        if begin != expected:
            what = "overlaps the previous one" if begin < expected else "leaves a hole before it"
            raise CheckpointError(f"{path}: tensor {key!r} (bytes {begin}..{end}) {what}")
        expected = end
    if data_start + expected != size:
        raise CheckpointError(f"{path}: the tensors cover {expected} bytes of data, the file holds {size - data_start}")
    return entries
