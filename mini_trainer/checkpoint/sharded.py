"""Sharded (FSDP2) model and optimizer state through `torch.distributed.checkpoint` (DCP),
read without unpickling anything a checkpoint could use to run code.

DCP's own reader unpickles `.metadata` with `pickle.load` and every non-tensor value with
`torch.load(weights_only=False)`: a crafted `sharded/` directory would run code on resume.
Here the directory is first checked against the manifest's listing (exactly the listed
files, regular files of the listed sizes; hashes too on the rank that verifies), then
`.metadata` goes through an unpickler that builds only DCP's own metadata classes, paths,
sizes and dtype names, the files it points at must be listed ones, and non-tensor values
are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .files import verify_tree
from .format import DTYPES

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a torch.layout by its name, from a fixed table
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
    "torch": {"Size", *DTYPES},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: any other global is refused before it is
    looked up, so no constructor or function of the checkpoint's choosing ever runs."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata; refusing to load it")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent references are not part of DCP's metadata")


def read_dcp_metadata(path: Path) -> Any:
    """DCP's `.metadata` file, unpickled with only DCP's metadata classes allowed."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise CheckpointError(f"{path}: not DCP metadata we can read safely ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def check_dcp_metadata(directory: Path, listing: Mapping[str, Any], metadata_file: str = ".metadata") -> Any:
    """Read `directory`'s DCP metadata safely and check that every piece of data it points
    at lies in a file of `listing`, read plainly (no stream transforms). Returns it."""
    if metadata_file not in listing:
        raise CheckpointError(f"{directory}: the manifest lists no DCP {metadata_file} file")
    metadata = read_dcp_metadata(directory / metadata_file)
    storage = metadata.storage_data if isinstance(metadata.storage_data, Mapping) else None
    if storage is None:
        raise CheckpointError(f"{directory}: DCP metadata without storage information")
    for index, info in storage.items():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or relative not in listing or relative.startswith("."):
            raise CheckpointError(
                f"{directory}: DCP metadata points {index} at {relative!r}, which is not a listed shard file"
            )
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{directory}: DCP metadata asks for stream transforms {info.transform_descriptors!r}; "
                "none are written here"
            )
    return metadata


def _safe_reader(directory: Path, listing: Mapping[str, Any]) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            name = Path(self._get_metadata_path(kwargs.get("rank"))).name
            metadata = check_dcp_metadata(directory, listing, name)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(directory)


def _safe_planner() -> Any:
    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, but non-tensor values (param-group numbers, strings)
        are read with `torch.load(weights_only=True)`, which builds only plain data."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._nested_dict import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyLoadPlanner()


def load_sharded(shards: dict[str, Any], directory: Path, listing: Mapping[str, Any]) -> None:
    """Read DCP shards from `directory` into `shards` (this rank's sharded state dicts,
    filled in place; DCP reshards when the number of processes changed). `listing` is the
    manifest's `{file: {sha256, bytes}}` for the directory: its names and sizes are checked
    here (the hashes by whoever verified the checkpoint), before DCP opens anything."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    verify_tree(directory, listing, pool=None)
    try:
        with single_process_dcp_quiet():
            dcp.load(shards, storage_reader=_safe_reader(directory, listing), planner=_safe_planner())
    except CheckpointError:
        raise
    except CheckpointException as err:  # a BaseException: DCP's wrapper of what failed on any rank
        causes = _causes(err)
        refused = [c for c in causes if isinstance(c, (CheckpointError, pickle.UnpicklingError))]
        if refused:
            raise CheckpointError(f"{directory}: refused to load: {str(refused[0]).splitlines()[0][:500]}") from None
        raise CheckpointError(f"{directory}: the shards do not load into this model: {_first_line(causes)}") from None
    except Exception as err:  # a mismatch between the shards and the model
        raise CheckpointError(
            f"{directory}: the shards do not load into this model ({type(err).__name__}: {str(err)[:1000]})"
        ) from err


def _causes(err: Any) -> list[BaseException]:
    """The errors behind DCP's CheckpointException, one per failed rank."""
    return [failure[0] if isinstance(failure, tuple) else failure for failure in err.failures.values()]


def _first_line(causes: list[Any]) -> str:
    return next((f"{type(c).__name__}: {str(c).splitlines()[0][:500]}" for c in causes if str(c)), "unknown error")


def save_sharded(shards: dict[str, Any], directory: Path) -> None:
    """Every rank writes its shards of `shards` into `directory` with DCP (each file
    fsynced; returns once every rank's are written, and raises on every rank if one failed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with single_process_dcp_quiet():
            dcp.save(shards, checkpoint_id=directory)
    except CheckpointException as err:  # a BaseException: make it one the caller's handlers see
        causes = _causes(err)
        oserror = next((c for c in causes if isinstance(c, OSError)), None)
        if oserror is not None:
            raise OSError(
                oserror.errno, f"{oserror.strerror or oserror} (while writing shards to {directory})"
            ) from None
        raise CheckpointError(f"writing shards to {directory} failed: {_first_line(causes)}") from None


@contextlib.contextmanager
def single_process_dcp_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group; one process is a supported case."""
    from .. import distributed

    with warnings.catch_warnings():
        if not distributed.is_distributed():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
