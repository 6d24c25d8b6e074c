"""The on-disk checkpoint format: exact round trips, interoperability, damage detection,
fallback to the previous checkpoint, keep policies, and no code execution on load."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from helpers import make_trainer, regression_batches
from mini_trainer import checkpoint
from mini_trainer.checkpoint import CheckpointError


def assert_same(a, b, path="state"):
    """Equal values *and* types all the way down (a list is not a tuple, 1 is not 1.0)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert torch.equal(a.cpu(), b), path
        return
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
        return
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def trained_state(steps: int = 3, **kwargs):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    trainer = make_trainer(regression_batches(5, 8), optimizer="adam", model=model, max_steps=steps, **kwargs)
    trainer._given["lr_scheduler"] = torch.optim.lr_scheduler.StepLR(trainer._given["optimizer"], step_size=2)
    trainer.train()
    return trainer, trainer.state_dict()


def test_trainer_state_round_trips_exactly_through_disk(tmp_path):
    trainer, state = trained_state()
    state["extra"] = {
        1: (float("nan"), float("inf"), -0.0, 2**40),
        "$looks_like_a_tag": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "np_scalar": np.float32(1.5),
        "np_array": np.arange(5, dtype=np.int16),
        "empty": torch.empty(0, 3),
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "view": torch.arange(12.0).reshape(3, 4)[:, 1],  # not contiguous
        "nested": [[1, "a", None, True], {"x": torch.tensor(3)}],
    }
    directory = checkpoint.save_checkpoint(state, tmp_path)
    loaded = checkpoint.load_checkpoint(directory)
    assert_same(state, loaded)
    assert_same(state, checkpoint.load_checkpoint(tmp_path))  # the run's root: its newest checkpoint
    torch.set_rng_state(loaded["rng"]["torch"])  # small tensors own their storage (this once crashed)
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])


def test_layout_manifest_and_latest_pointer(tmp_path):
    _, state = trained_state()
    directory = checkpoint.save_checkpoint(state, tmp_path)
    assert directory == tmp_path / "step_000000003"
    assert (tmp_path / "latest").read_text() == "step_000000003\n"
    assert sorted(os.listdir(directory)) == ["manifest.json", "model.safetensors", "optimizer.safetensors"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format"] == "mini_trainer.checkpoint" and manifest["version"] == 1
    assert (manifest["step"], manifest["epoch"]) == (3, 0)
    for name, info in manifest["files"].items():
        assert len(info["sha256"]) == 64 and info["bytes"] == (directory / name).stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_model_file_is_plain_safetensors(tmp_path):
    trainer, state = trained_state()
    directory = checkpoint.save_checkpoint(state, tmp_path)
    plain = load_file(directory / "model.safetensors")
    assert plain.keys() == trainer.model.state_dict().keys()
    fresh = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    fresh.load_state_dict(plain)
    for a, b in zip(fresh.state_dict().values(), trainer.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_our_writer_reads_back_files_of_the_reference_writer(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.ones(2, dtype=torch.bfloat16),
        "flag": torch.tensor([True, False]),
    }
    save_file(tensors, tmp_path / "ref.safetensors")
    ours = checkpoint.read_safetensors(tmp_path / "ref.safetensors")
    digest, size = checkpoint.write_safetensors(tmp_path / "ours.safetensors", tensors)
    theirs = load_file(tmp_path / "ours.safetensors")
    assert size == (tmp_path / "ours.safetensors").stat().st_size
    for key, value in tensors.items():
        assert torch.equal(ours[key], value) and torch.equal(theirs[key], value)
    import hashlib

    assert digest == hashlib.sha256((tmp_path / "ours.safetensors").read_bytes()).hexdigest()


def test_tied_weights_are_stored_under_both_names(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    directory = checkpoint.save_checkpoint({"step": 1, "model": model.state_dict(), "optimizer": {}}, tmp_path)
    plain = load_file(directory / "model.safetensors")
    assert torch.equal(plain["0.weight"], plain["1.weight"])


def test_unsupported_values_name_their_path():
    with pytest.raises(TypeError, match=r"'hooks.mine.callback'"):
        checkpoint.split_state({"hooks": {"mine": {"callback": print}}})
    with pytest.raises(TypeError, match="cannot store"):
        checkpoint.write_safetensors(os.devnull, {"z": torch.zeros(2, dtype=torch.complex64)}, fsync=False)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_newest_checkpoint_is_reported_and_previous_used(tmp_path, caplog, damage):
    trainer, older = trained_state(steps=2)
    checkpoint.save_checkpoint(older, tmp_path)
    older = copy.deepcopy(older)  # state_dict() holds live tensors: training on changes them
    trainer.max_steps = 4
    trainer.train()
    newest = checkpoint.save_checkpoint(trainer.state_dict(), tmp_path)
    victim = newest / "optimizer.safetensors"
    if damage == "flip":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(victim, victim.stat().st_size // 2)
    elif damage == "delete":
        victim.unlink()
    else:
        (newest / "manifest.json").write_text('{"format": "mini_trainer.checkpoint", "vers')
    with pytest.raises(CheckpointError):
        checkpoint.load_checkpoint(newest)  # asked for by name: an error, not a silent substitute
    with caplog.at_level(logging.WARNING, logger="mini_trainer"):
        found, state = checkpoint.find_latest(tmp_path)
    assert found.name == "step_000000002" and state["step"] == 2
    assert "step_000000004" in caplog.text and "cannot be used" in caplog.text
    assert_same(older, state)


def test_a_bit_flip_in_the_manifest_is_detected(tmp_path):
    _, state = trained_state(steps=2)
    directory = checkpoint.save_checkpoint(state, tmp_path)
    text = (directory / "manifest.json").read_text()
    (directory / "manifest.json").write_text(text.replace('"step": 2', '"step": 3', 1))  # still valid JSON
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoint.load_checkpoint(directory)


def test_numpy_scalars_round_trip_with_their_type(tmp_path):
    state = {
        "step": 1,
        "model": {},
        "values": [np.float64(1.5), np.float64("nan"), np.float32("inf"), np.int64(7), np.bool_(True)],
    }
    back = checkpoint.load_checkpoint(checkpoint.save_checkpoint(state, tmp_path))["values"]
    assert [type(v) for v in back] == [np.float64, np.float64, np.float32, np.int64, np.bool_]
    assert back[0] == 1.5 and np.isnan(back[1]) and np.isinf(back[2]) and back[3] == 7 and back[4]


def test_a_kill_while_a_step_is_saved_again_loses_neither_copy(tmp_path, monkeypatch):
    _, state = trained_state(steps=2)
    checkpoint.save_checkpoint(state, tmp_path)
    real_replace = os.replace

    def killed_after_moving_the_old_copy_aside(src, dst):
        real_replace(src, dst)
        if ".replaced-" in str(dst):
            raise KeyboardInterrupt  # stands for a kill between the two renames

    monkeypatch.setattr(os, "replace", killed_after_moving_the_old_copy_aside)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(state, tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    found, loaded = checkpoint.find_latest(tmp_path)  # the moved copy is still found
    assert loaded["step"] == 2
    checkpoint.remove_temporaries(tmp_path)
    checkpoint.save_checkpoint(state, tmp_path)
    checkpoint.prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000000002"]


def test_find_latest_ignores_temporaries_and_uses_newest_complete(tmp_path):
    _, state = trained_state(steps=2)
    checkpoint.save_checkpoint(state, tmp_path)
    dead = _exited_pid()
    killed = tmp_path / f".tmp-step_000000009-{dead}-abcd"  # a writer killed mid-way
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".tmp-step_000000010-{os.getppid()}-0123abcd"  # a process still writing it
    live.mkdir()
    (tmp_path / ".trash-step_000000001-5-ab").mkdir()  # being deleted: nobody's
    found, _ = checkpoint.find_latest(tmp_path)
    assert found.name == "step_000000002"
    checkpoint.remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "latest", "step_000000002"]
    assert checkpoint.find_latest(tmp_path / "nothing-here") is None


def _exited_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_saving_the_same_step_again_replaces_it(tmp_path):
    _, state = trained_state(steps=2)
    checkpoint.save_checkpoint(state, tmp_path)
    state["epoch"] = 5
    checkpoint.save_checkpoint(state, tmp_path)
    assert checkpoint.load_checkpoint(tmp_path)["epoch"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000000002"]


def test_prune_keeps_newest_and_interval_multiples(tmp_path):
    for step in range(1, 11):
        (tmp_path / checkpoint.checkpoint_name(step)).mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    deleted = checkpoint.prune_checkpoints(
        tmp_path, keep_last=2, keep_interval=4, protect=[tmp_path / "step_000000001"]
    )
    assert sorted(p.name for p in deleted) == [f"step_00000000{i}" for i in (2, 3, 5, 6, 7)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt",
        "step_000000001",
        "step_000000004",
        "step_000000008",
        "step_000000009",
        "step_000000010",
    ]


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MARKER']}",))


def test_a_pickle_that_runs_code_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MARKER", str(marker))
    evil = tmp_path / "checkpoint.pt"
    evil.write_bytes(pickle.dumps({"step": 1, "model": _RunsCode()}))
    with pytest.raises(CheckpointError, match="weights_only"):
        checkpoint.load_checkpoint(evil)
    # Also as torch.save would write it (a zip archive holding the pickle).
    evil_zip = tmp_path / "checkpoint_zip.pt"
    torch.save({"step": 1, "model": _RunsCode()}, evil_zip)
    with pytest.raises(CheckpointError):
        checkpoint.load_checkpoint(evil_zip)
    assert not marker.exists()


def test_a_torch_saved_trainer_state_loads_with_weights_only(tmp_path):
    trainer, state = trained_state()
    torch.save(state, tmp_path / "state.pt")
    loaded = checkpoint.load_checkpoint(tmp_path / "state.pt")
    other, _ = trained_state(steps=1)
    other.load_state_dict(loaded)
    assert other.step == 3
    for a, b in zip(other.model.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_manifest_cannot_point_outside_the_checkpoint(tmp_path):
    _, state = trained_state()
    directory = checkpoint.save_checkpoint(state, tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    manifest["checksum"] = checkpoint.manifest_checksum(manifest)  # a deliberate edit, not damage
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="outside"):
        checkpoint.load_checkpoint(directory)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no valid step_"):
        checkpoint.load_checkpoint(tmp_path)
