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
    <root>/best                one line: the name of the best checkpoint by an evaluation
                               result (`CheckpointingHook(keep_best=...)`); its manifest
                               records the metric, mode and value, and that step's results
    <root>/.lock               held (flock) by the run writing here

The modules: `format` (state <-> JSON skeleton + tensors), `safetensors_io` (the files),
`files` (durable writes, hashes, no symbolic links), `writing` (atomic directories, pruning),
`loading` (verify, then parse), `sharded` (DCP without unpickling), `lock` (one run per
directory). The writer streams each tensor's memory straight to the file while a second
thread hashes the same bytes, and files are written in parallel; reading does the same in
reverse (`benchmarks/checkpoint_io.py` measures it). What is verified before anything is
parsed, and which directories are safe to resume from: docs/checkpoints.md.
"""

from .errors import CheckpointDirectoryError, CheckpointError
from .files import write_file
from .format import DEFAULT_FILE, DTYPES, MODEL_FILE, join_state, split_state
from .inspection import (
    NotACheckpointError,
    describe_checkpoint,
    export_weights,
    list_checkpoint_root,
    verify_checkpoint,
)
from .loading import (
    LoadedCheckpoint,
    find_latest,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    read_pointer,
)
from .lock import DirectoryLock, prepare_directory
from .safetensors_io import read_safetensors, read_safetensors_header, write_safetensors
from .sharded import load_sharded, read_dcp_metadata, save_sharded
from .writing import (
    BEST,
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    SHARDED_DIR,
    PreparedCheckpoint,
    StagingBuffers,
    checkpoint_name,
    list_checkpoints,
    manifest_checksum,
    new_temporary,
    prepare_checkpoint,
    prune_checkpoints,
    remove_temporaries,
    save_checkpoint,
    write_checkpoint,
    write_pointer,
)

__all__ = [
    "BEST",
    "DEFAULT_FILE",
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "LATEST",
    "MANIFEST",
    "MODEL_FILE",
    "SHARDED_DIR",
    "CheckpointDirectoryError",
    "CheckpointError",
    "DirectoryLock",
    "LoadedCheckpoint",
    "NotACheckpointError",
    "PreparedCheckpoint",
    "StagingBuffers",
    "checkpoint_name",
    "describe_checkpoint",
    "export_weights",
    "find_latest",
    "join_state",
    "latest_checkpoint",
    "list_checkpoint_root",
    "list_checkpoints",
    "load_checkpoint",
    "load_sharded",
    "manifest_checksum",
    "new_temporary",
    "prepare_checkpoint",
    "prepare_directory",
    "prune_checkpoints",
    "read_checkpoint",
    "read_dcp_metadata",
    "read_pointer",
    "read_safetensors",
    "read_safetensors_header",
    "remove_temporaries",
    "save_checkpoint",
    "save_sharded",
    "split_state",
    "verify_checkpoint",
    "write_checkpoint",
    "write_file",
    "write_pointer",
    "write_safetensors",
]
