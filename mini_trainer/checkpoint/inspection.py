"""Checkpoints seen from outside a run: list, describe, verify, export (`mini-trainer ckpt`).

A checkpoint directory is untrusted input here as in loading: JSON manifest checked against
its checksum, no links followed, safetensors headers validated, DCP `.metadata` only through
`sharded.py`'s safe unpickler, nothing else unpickled. `verify_checkpoint` re-hashes every
file as a stream; `describe_checkpoint` reads the manifest and headers only.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import inspect
import math
import os
import secrets
import stat
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils import as_path, check_flag
from . import loading
from .errors import CheckpointError
from .files import check_listed_file, fsync_dir, hash_file, is_count, verify_tree
from .format import join_state, unwrapped_names
from .loading import latest_checkpoint, read_checkpoint, read_manifest, read_pointer, sharded_listing
from .safetensors_io import SAFETENSORS_DTYPES, read_safetensors_header, write_safetensors
from .sharded import check_dcp_metadata, load_sharded
from .writing import BEST, FORMAT, LATEST, MANIFEST, SHARDED_DIR, STEP_DIR, TEMPORARY, list_checkpoints

#: the `dtype` names `export_weights` accepts
EXPORT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
_MAX_MANIFEST_PEEK = 1 << 20  # bytes read to tell our manifest.json from someone else's


class NotACheckpointError(CheckpointError):
    """No such path, or no checkpoint (root) there: a usage error (`mini-trainer ckpt`: 2)."""


@dataclass
class Problem:
    """Why a checkpoint is damaged: `file` relative to its directory (None: the whole)."""

    file: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}" if self.file else self.reason


@dataclass
class Verification:
    """What `verify_checkpoint` found. `state` is the training state with `meta` tensors
    (shapes and dtypes, no data), when the manifest and every header could be read."""

    path: Path
    problems: list[Problem] = field(default_factory=list)
    manifest: dict[str, Any] | None = None  # read, and checked against its checksum
    headers: dict[str, dict[str, tuple[torch.dtype, list[int]]]] = field(default_factory=dict)
    state: dict[str, Any] | None = None
    dcp_metadata: Any = None
    size: int = 0  # bytes on disk, all files (sharded/ included)

    @property
    def valid(self) -> bool:
        return not self.problems

    def get(self, key: str, kind: type | tuple[type, ...] = object) -> Any:
        """The manifest's `key` if the manifest could be read and it is a `kind`, else None."""
        value = (self.manifest or {}).get(key)
        return value if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) else None


def locate(path: str | os.PathLike) -> tuple[str, Path, str | None]:
    """`("checkpoint", directory, None)` (our manifest.json is there) or `("root", root, note)`:
    a checkpoint root (step_* directories, `latest`, `best`, the run lock), or a run directory
    whose `checkpoints/` is one (`note` says so). Else NotACheckpointError: what was sought."""
    given = as_path("path", path)
    if not given.exists():
        raise NotACheckpointError(f"{given}: no such file or directory")
    if not given.is_dir():
        raise NotACheckpointError(
            f"{given} is a file, not a checkpoint directory (a directory such as step_000001000 with a {MANIFEST})")
    if (given / MANIFEST).exists() or (given / MANIFEST).is_symlink():
        if _ours(given):
            return "checkpoint", given, None
        raise NotACheckpointError(f"{given}: foreign directory: its {MANIFEST} is not a {FORMAT} manifest")
    if _is_root(given):
        return "root", given, None
    run = given / "checkpoints"
    if run.is_dir() and not run.is_symlink() and _is_root(run):
        return "root", run, f"the checkpoints of run directory {given}"
    raise NotACheckpointError(
        f"{given}: foreign directory: looked for {MANIFEST} (a checkpoint), step_* directories or a `latest` "
        f"file (a checkpoint root), and {run.name}/ holding them (a run directory); found none")


def _ours(directory: Path) -> bool:
    # A damaged manifest of ours is ours (verify reports it); foreign: never names our format.
    if STEP_DIR.match(directory.name):
        return True
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(directory / MANIFEST).st_mode):  # no link, no FIFO to block on
            with open(directory / MANIFEST, "rb") as f:
                return FORMAT.encode() in f.read(_MAX_MANIFEST_PEEK)
    return False


def _is_root(directory: Path) -> bool:
    return bool(list_checkpoints(directory)) or any((directory / n).is_file() for n in (LATEST, BEST, ".lock"))


def verify_checkpoint(path: str | os.PathLike, *, hash: bool = True) -> Verification:
    """Check one checkpoint directory as loading does, collecting every problem instead of
    stopping at the first: the manifest (JSON, format, version, checksum, counters), each
    listed file (a regular file, not a link, of the listed size; with `hash` its sha256,
    streamed), each safetensors header, the `sharded/` tree (exactly the listed files,
    hashes too) and its DCP metadata, and the state's tensor references against the files.
    Nothing is parsed before its checks passed."""
    directory = as_path("path", path)
    result = Verification(directory, size=_disk_size(directory))
    try:
        manifest = result.manifest = read_manifest(directory)
        listing = sharded_listing(directory, manifest, sharded=True)
    except (CheckpointError, OSError) as err:
        result.problems.append(Problem(MANIFEST, _reason(err, directory / MANIFEST, directory)))
        return result
    files = manifest["files"]
    outside = loading.files_outside(files)
    result.problems += [Problem(None, f"{MANIFEST} names a file outside it: {str(n)[:100]!r}") for n in outside]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # hashlib lets go of the GIL: files hash in parallel
        futures = {n: pool.submit(_check_file, directory / n, i, hash) for n, i in files.items() if n not in outside}
        if listing is not None:
            shards = directory / SHARDED_DIR
            try:
                verify_tree(shards, listing, pool if hash else None)
                result.dcp_metadata = check_dcp_metadata(shards, listing)
            except CheckpointError as err:  # name the shard file the message is about
                name = next((n for n in sorted(listing, key=len, reverse=True) if str(shards / n) in str(err)), "")
                result.problems.append(Problem(f"{SHARDED_DIR}/{name}", _reason(err, shards / name, directory)))
        for name, future in futures.items():
            try:
                result.headers[name] = future.result()
            except (CheckpointError, OSError) as err:
                result.problems.append(Problem(name, _reason(err, directory / name, directory)))
    if len(result.headers) < len(files):
        return result
    # The skeleton joined with shape-only tensors: every reference checked, no data read.
    meta = {file: {key: torch.empty(shape, dtype=dtype, device="meta") for key, (dtype, shape) in entries.items()}
            for file, entries in result.headers.items()}
    try:
        state = join_state(manifest["state"], meta)
    except CheckpointError as err:
        result.problems.append(Problem(MANIFEST, str(err)))
        return result
    mismatch = loading.state_mismatch(state, manifest, listing is not None)
    if mismatch is not None:
        result.problems.append(Problem(MANIFEST, mismatch))
    else:
        result.state = state
    return result


def _check_file(path: Path, info: Mapping[str, Any], hash: bool) -> dict[str, tuple[torch.dtype, list[int]]]:
    if not os.path.lexists(path):
        raise CheckpointError("missing")
    check_listed_file(path, info)
    if hash:
        digest, size = hash_file(path, follow_symlinks=False)
        if size != info["bytes"] or digest != info["sha256"]:
            raise CheckpointError("does not match its sha256 in the manifest (damaged or truncated)")
    return read_safetensors_header(path, follow_symlinks=False)[0]


def _reason(err: BaseException, path: Path, directory: Path) -> str:
    text = str(err)  # without the path it starts with: the report names the file already
    prefix = next((p for p in (str(path), str(directory)) if text.startswith(p)), "")
    return text[len(prefix):].lstrip(":/ ") or text


def _disk_size(directory: Path) -> int:
    with contextlib.suppress(OSError):  # os.walk follows no links; a file may vanish meanwhile
        return sum(os.lstat(os.path.join(root, n)).st_size for root, _, names in os.walk(directory) for n in names)
    return 0


@dataclass
class Listing:
    """A root's checkpoints (verified, oldest first), pointers, leftovers, warnings."""

    root: Path
    note: str | None
    checkpoints: list[Verification]
    latest: Path | None
    best: Path | None
    leftovers: list[str]
    warnings: list[str]


def list_checkpoint_root(path: str | os.PathLike, *, hash: bool = True) -> Listing:
    """Verify every checkpoint of a checkpoint root (or of a run directory's `checkpoints/`,
    or of the root a checkpoint directory is in); `hash=False` checks sizes, not hashes."""
    kind, given, note = locate(path)
    root = given if kind == "root" else given.parent
    latest, best = read_pointer(root, LATEST), read_pointer(root, BEST)
    directories = [d for _, d in list_checkpoints(root)]
    for extra in (latest, best, given if kind == "checkpoint" else None):  # e.g. renamed by hand
        if extra is not None and extra not in directories and (extra / MANIFEST).exists():
            directories.append(extra)
    warnings = [f"`{name}` names {pointer.name}, which is not there" for name, pointer in
                ((LATEST, latest), (BEST, best)) if pointer is not None and not pointer.is_dir()]
    leftovers = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(root)
                       if TEMPORARY.match(entry.name) or entry.name.startswith(".trash-"))
    leftovers += [d.name + "/" for d in directories if ".replaced-" in d.name]  # a kill during a re-save
    checked = [verify_checkpoint(d, hash=hash) for d in directories]
    return Listing(root, note, checked, latest, best, leftovers, warnings)


@dataclass
class FileSummary:
    """A checkpoint's file; safetensors: its tensors, elements, {dtype: tensors}."""

    name: str
    bytes: int | None
    tensors: int | None = None
    elements: int | None = None
    dtypes: dict[str, int] = field(default_factory=dict)


@dataclass
class Description:
    """What `describe_checkpoint` found; manifest entries through `verification.get`, the
    state (hooks, world size, scheduler, scaler; meta tensors) as `verification.state`."""

    path: Path
    note: str | None
    verification: Verification
    markers: list[str] = field(default_factory=list)  # "latest", "best": the pointers that name it
    files: list[FileSummary] = field(default_factory=list)
    sharded_files: list[FileSummary] = field(default_factory=list)  # tensors: the chunks stored in each
    sharded_tensors: dict[str, FileSummary] = field(default_factory=dict)  # "model", "optimizer" in DCP metadata
    optimizer: str | None = None
    optimizer_inferred: bool = False  # not recorded in the manifest: guessed by `infer_optimizer`
    param_groups: list[dict[str, Any]] = field(default_factory=list)  # hyperparameters; "params": how many
    optimizer_slots: list[str] = field(default_factory=list)  # per-parameter state names (exp_avg, ...)


def describe_checkpoint(path: str | os.PathLike) -> Description:
    """Describe a checkpoint (for a root or run directory: the one `latest` names) from its
    manifest and safetensors headers; sizes and headers are checked, hashes are not (see
    `verify_checkpoint`). What is wrong is in `description.verification.problems`."""
    kind, directory, note = locate(path)
    if kind == "root":
        root, which, directory = directory, "the checkpoint `latest` names", read_pointer(directory, LATEST)
        if directory is None:
            found = list_checkpoints(root)
            if not found:
                raise NotACheckpointError(f"{root} holds no checkpoint to inspect")
            directory, which = found[-1][1], "the newest checkpoint (there is no `latest` file)"
        note = f"{which} in {root}" + (f", {note}" if note else "")
    checked = verify_checkpoint(directory, hash=False)
    info = Description(directory, note, checked)
    info.markers = [name for name in (LATEST, BEST) if read_pointer(directory.parent, name) == directory]
    for name, entry in (checked.get("files", dict) or {}).items():
        counted = (0, 0) if name in checked.headers else ()  # a missing or damaged file: nothing to count
        info.files.append(_count(FileSummary(name, _bytes(entry), *counted), checked.headers.get(name, {}).values()))
    sharded = (checked.get("directories", dict) or {}).get(SHARDED_DIR)
    info.sharded_files = [FileSummary(n, _bytes(e)) for n, e in (sharded.items() if isinstance(sharded, dict) else ())]
    state = checked.state or {}
    optimizer = state.get("optimizer") if isinstance(state.get("optimizer"), Mapping) else {}
    slots = optimizer.get("state") if isinstance(optimizer.get("state"), Mapping) else {}
    info.optimizer_slots = sorted({str(s) for e in slots.values() if isinstance(e, Mapping) for s in e})
    if checked.dcp_metadata is not None:
        _describe_sharded(info, checked)
    elif isinstance(optimizer.get("param_groups"), list):
        info.param_groups = [_group(g) for g in optimizer["param_groups"] if isinstance(g, Mapping)]
    info.optimizer = checked.get("optimizer_class", str)
    if info.optimizer is None and info.param_groups:
        info.optimizer, info.optimizer_inferred = infer_optimizer(info.param_groups), True
    return info


def _bytes(entry: Any) -> int | None:
    return entry.get("bytes") if isinstance(entry, Mapping) else None


def _count(summary: FileSummary, entries: Any) -> FileSummary:
    for dtype, shape in entries:
        summary.tensors, summary.elements = (summary.tensors or 0) + 1, (summary.elements or 0) + math.prod(shape)
        name = str(dtype).removeprefix("torch.")
        summary.dtypes[name] = summary.dtypes.get(name, 0) + 1
    return summary


def _group(group: Mapping[str, Any]) -> dict[str, Any]:
    params = group.get("params")
    return {**{str(k): v for k, v in group.items() if k != "params"},
            "params": len(params) if isinstance(params, list) else params}


def _dcp_entries(metadata: Any, where: Path) -> list[tuple[str, torch.dtype | None, list[int]]]:
    """`(key, dtype, size)` of each entry of DCP metadata (dtype None: not a tensor). Checked:
    the safe unpickler builds only DCP's classes, but their attributes may hold anything."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries, checked = getattr(metadata, "state_dict_metadata", None), []
    for fqn, item in (entries.items() if isinstance(entries, Mapping) else [(None, None)]):
        dtype, size = getattr(getattr(item, "properties", None), "dtype", None), getattr(item, "size", None)
        if isinstance(fqn, str) and not isinstance(item, TensorStorageMetadata):
            checked.append((fqn, None, []))
        elif isinstance(fqn, str) and isinstance(dtype, torch.dtype) and isinstance(size, (list, tuple)) \
                and all(is_count(n) for n in size):
            checked.append((fqn, dtype, list(size)))
        else:
            raise CheckpointError(f"{where}: malformed DCP metadata entry {str(fqn)[:100]!r}")
    return checked


def _describe_sharded(info: Description, checked: Verification) -> None:
    """The DCP metadata's tensors by top-level key, slot names, and the param groups."""
    by_file = Counter(item.relative_path for item in checked.dcp_metadata.storage_data.values())
    for summary in info.sharded_files:
        summary.tensors = by_file.get(summary.name)
    groups: dict[int, dict[str, Any]] = {}
    for fqn, dtype, size in _dcp_entries(checked.dcp_metadata, info.path / SHARDED_DIR):
        top, _, rest = fqn.partition(".")
        parts = rest.split(".")
        if dtype is not None:
            _count(info.sharded_tensors.setdefault(top, FileSummary(top, None)), [(dtype, size)])
            if top == "optimizer" and len(parts) > 2 and parts[0] == "state":
                info.optimizer_slots = sorted({*info.optimizer_slots, parts[-1]})
        elif top == "optimizer" and len(parts) == 3 and parts[0] == "param_groups" and parts[1].isdigit():
            groups.setdefault(int(parts[1]), {})[parts[2]] = None
    placeholders = {"optimizer": {"param_groups": [groups[i] for i in sorted(groups)]}}
    try:  # only these plain values are read, through the weights-only planner
        load_sharded(placeholders, info.path / SHARDED_DIR, checked.get("directories")[SHARDED_DIR])
    except CheckpointError as err:
        checked.problems.append(Problem(f"{SHARDED_DIR}/", f"its param groups cannot be read: {err}"))
        return
    info.param_groups = [_group(g) for g in placeholders["optimizer"]["param_groups"]]


def infer_optimizer(groups: list[dict[str, Any]]) -> str | None:
    """A guess at the torch.optim class of a checkpoint that does not record it: each keeps
    exactly its constructor's keyword arguments in every param group (None: no match)."""
    keys = {k for g in groups for k in g} - {"params", "initial_lr", "param_names"}
    matches = []
    for name in dir(torch.optim):
        cls = getattr(torch.optim, name)
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer:
            if keys and set(inspect.signature(cls.__init__).parameters) - {"self", "params"} == keys:
                matches.append(f"torch.optim.{name}")
    if "torch.optim.Adam" in matches and any(g.get("decoupled_weight_decay") is True for g in groups):
        matches = ["torch.optim.AdamW"]  # AdamW is Adam with this flag set
    return " or ".join(matches) or None


@dataclass
class Export:
    """What `export_weights` wrote (`metadata`: its `__metadata__`; `left_out`: non-tensor
    entries; `renamed`: keys that lost wrapper prefixes)."""

    output: Path
    source: Path
    note: str | None
    tensors: int
    elements: int
    metadata: dict[str, str]
    renamed: int
    left_out: list[str]


def export_weights(path: str | os.PathLike, output: str | os.PathLike, *, ema: bool | str = False,
                   dtype: str | torch.dtype | None = None, force: bool = False) -> Export:
    """Write a checkpoint's model weights (`ema`: an EmaHook's; a string names its state key)
    as plain safetensors for `model.load_state_dict(safetensors.torch.load_file(...))`, under
    the unwrapped module's names (no `module.`, `_orig_mod.`, FSDP1 parts); sharded (FSDP2)
    checkpoints are gathered on CPU here. `dtype` casts floating-point tensors. Verified in
    full first (a root or run directory: its newest valid checkpoint); written atomically;
    an existing file is replaced only with `force`. `__metadata__`: format "pt", step,
    epoch, source (absolute path), weights ("model"/"ema"), hook, dtype, mini_trainer_version."""
    from .. import __version__

    output = as_path("export_weights(output)", output)
    check_flag("export_weights(force)", force)
    if not isinstance(ema, (bool, str)):
        raise TypeError(f"export_weights(ema) must be True, False or an EMA hook's name; got {ema!r}")
    if isinstance(dtype, str) and dtype.lower() in EXPORT_DTYPES:
        dtype = EXPORT_DTYPES[dtype.lower()]
    if dtype is not None and dtype not in EXPORT_DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    if output.is_dir() or not output.parent.is_dir():
        raise NotACheckpointError(f"output {output}: " + ("is a directory; give a file name such as model.safetensors"
                                                          if output.is_dir() else f"{output.parent} does not exist"))
    if (output.exists() or output.is_symlink()) and not force:
        raise FileExistsError(f"output {output} exists; pass force=True (--force) to replace it")
    kind, directory, note = locate(path)
    if kind == "root":
        loaded = latest_checkpoint(directory, sharded=True)
        if loaded is None:
            raise NotACheckpointError(f"{directory} holds no checkpoint to export")
        note = f"the newest valid checkpoint in {directory}" + (f", {note}" if note else "")
    else:
        loaded = read_checkpoint(directory, sharded=True)
    state = loaded.state
    hook = _ema_hook(state, ema, loaded.path) if ema else None
    if hook is not None:
        weights = dict(state["hooks"][hook]["weights"])
        if "n_averaged" in weights and all(k == "n_averaged" or k.startswith("module.") for k in weights):
            del weights["n_averaged"]  # torch.optim.swa_utils.AveragedModel's counter, not a weight
    elif loaded.sharded_files is not None:
        weights = _gather_sharded(loaded.path, loaded.sharded_files)
    else:
        weights = dict(state["model"])
    left_out = sorted(str(k) for k, v in weights.items() if not isinstance(v, torch.Tensor))
    tensors, renamed = unwrapped_names({str(k): v for k, v in weights.items() if isinstance(v, torch.Tensor)})
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {"format": "pt", "step": str(state["step"]), "epoch": str(state.get("epoch")),
                "source": str(loaded.path.resolve()), "weights": "ema" if hook else "model",
                **({"hook": hook} if hook else {}), **({"dtype": str(dtype).removeprefix("torch.")} if dtype else {}),
                "mini_trainer_version": str(__version__)}
    _write_new(output, tensors, metadata, force)
    return Export(output, loaded.path, note, len(tensors), sum(t.numel() for t in tensors.values()), metadata,
                  renamed, left_out)


def _ema_hook(state: Mapping[str, Any], ema: bool | str, directory: Path) -> str:
    """The key of the EMA hook's state: a dict with "weights" (as EmaHook saves it)."""
    hooks = state.get("hooks") if isinstance(state.get("hooks"), Mapping) else {}
    found = [str(k) for k, v in hooks.items() if isinstance(v, Mapping) and isinstance(v.get("weights"), Mapping)]
    if not found or isinstance(ema, str) and ema not in found:
        named = f" named {ema!r}" if isinstance(ema, str) else ""
        raise ValueError(f"{directory} has no EMA weights{named} (an EmaHook's state); it holds the model weights and "
                         f"the state of the hooks: {', '.join(map(str, hooks)) or 'none'}")
    if not isinstance(ema, str) and len(found) > 1:
        raise ValueError(f"{directory} holds several EMA weights ({', '.join(found)}); name one")
    return ema if isinstance(ema, str) else found[0]


def _gather_sharded(directory: Path, listing: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The full model tensors of a DCP `sharded/` directory, in this one process on CPU:
    sizes and dtypes from the safely read metadata, the data through `load_sharded`."""
    shards = directory / SHARDED_DIR
    wanted: dict[str, tuple[list[int], torch.dtype]] = {}
    for fqn, dtype, size in _dcp_entries(check_dcp_metadata(shards, listing), shards):
        if fqn.startswith("model.") and dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{shards}: model entry {fqn!r} is not a tensor safetensors can hold")
        if fqn.startswith("model."):
            wanted[fqn.removeprefix("model.")] = (size, dtype)
    # A crafted metadata could ask for any size: the data has to come from the listed files.
    needed = sum(math.prod(size) * dtype.itemsize for size, dtype in wanted.values())
    available = sum(int(info["bytes"]) for info in listing.values())
    if needed > available:
        raise CheckpointError(f"{shards}: the model tensors need {needed} bytes, the shard files hold {available}")
    tensors = {key: torch.empty(size, dtype=dtype) for key, (size, dtype) in wanted.items()}
    load_sharded({"model": tensors}, shards, listing)
    return tensors


def _write_new(output: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], force: bool) -> None:
    """Write a temporary in the same directory, then move it into place (a reader never
    sees half a file); without `force`, a file that appeared meanwhile is kept."""
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write_safetensors(temporary, tensors, metadata)
        try:
            if not force:
                os.link(temporary, output)  # fails if the name exists: no check-then-overwrite race
        except FileExistsError:
            raise FileExistsError(f"output {output} exists; pass force=True (--force) to replace it") from None
        except OSError as err:  # a filesystem without hard links: check, then rename
            force = err.errno in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.ENOSYS) and not output.exists()
            if not force:
                raise
        if force:
            os.replace(temporary, output)
        fsync_dir(output.parent)
    finally:
        temporary.unlink(missing_ok=True)
