"""Checkpoint directories made by an attacker or by bad luck: nothing in them runs code,
every name, tag, size, shape and counter is checked before use, and a run resuming from
its own directory falls back to the previous good checkpoint."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import make_trainer, regression_batches
from mini_trainer import CheckpointingHook, checkpoint
from mini_trainer.checkpoint import CheckpointError


class Payload:
    """Unpickling this creates `marker`: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def trainer_for(workspace, steps=2, sharded=False, load="latest", model=None, **kwargs):
    return make_trainer(
        regression_batches(6, 8), optimizer="adam", max_steps=steps, workspace=workspace, model=model,
        hooks=[CheckpointingHook(interval=None, sharded=sharded, load=load)], **kwargs,
    )


def edit_manifest(directory: Path, change) -> None:
    """Rewrite a manifest as an attacker would: edited, then its checksum recomputed."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    manifest["checksum"] = checkpoint.manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))


def rehash_sharded(directory: Path) -> None:
    def relist(manifest):
        listing = manifest["directories"]["sharded"]
        for name in list(listing):
            data = (directory / "sharded" / name).read_bytes()
            listing[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    edit_manifest(directory, relist)


# =========================================================================== 1. no unpickling


@pytest.fixture
def sharded_run(tmp_path) -> Path:
    """A real sharded checkpoint (DCP) at step 2, after a plain one at step 1."""
    trainer_for(tmp_path / "ws", steps=1).train()
    trainer_for(tmp_path / "ws", steps=2, sharded=True).train()
    root = tmp_path / "ws" / "checkpoints"
    assert (root / "step_000000002" / "sharded" / ".metadata").is_file()
    return root


def plant_metadata_payload(root: Path, marker: Path) -> Path:
    newest = root / "step_000000002"
    (newest / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    rehash_sharded(newest)  # the hashes match: they prove integrity, not origin
    return newest


@pytest.mark.parametrize("sharded", [False, True], ids=["hook-plain", "hook-sharded"])
@pytest.mark.parametrize("load", ["latest", "path"])
def test_crafted_dcp_metadata_never_runs(sharded_run, tmp_path, sharded, load):
    marker = tmp_path / "pwned"
    newest = plant_metadata_payload(sharded_run, marker)
    if load == "latest":
        # The run's own directory: the crafted newest checkpoint is skipped for step 1.
        trainer = trainer_for(tmp_path / "ws", steps=3, sharded=sharded)
        trainer.train()
        assert trainer.hooks[0].resumed_from.name == "step_000000001"
    else:
        trainer = trainer_for(tmp_path / "other", steps=3, sharded=sharded, load=str(newest))
        match = "refusing to load it" if sharded else "sharded checkpoint"
        with pytest.raises(CheckpointError, match=match):
            trainer.train()
    assert not marker.exists()


def test_crafted_non_tensor_value_in_shards_never_runs(sharded_run, tmp_path):
    """DCP reads non-tensor values (param-group numbers) with torch.load(weights_only=False)."""

    marker = tmp_path / "pwned"
    newest = sharded_run / "step_000000002"
    trainer = trainer_for(tmp_path / "scratch", steps=1)
    trainer.build()
    model_state, optim_state = trainer.model_and_optimizer_state(sharded=True)
    optim_state["param_groups"][0]["lr"] = Payload(marker)
    shutil.rmtree(newest / "sharded")
    checkpoint.save_sharded({"model": model_state, "optimizer": optim_state}, newest / "sharded")
    rehash_sharded(newest)
    with pytest.raises(CheckpointError, match="refused to load"):
        trainer_for(tmp_path / "other", steps=3, sharded=True, load=str(newest)).train()
    assert not marker.exists()


def test_the_manifest_cannot_choose_where_shards_are_read(sharded_run, tmp_path):
    newest = sharded_run / "step_000000002"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(newest / "sharded", elsewhere)
    edit_manifest(newest, lambda m: m["state"].update(sharded="../../elsewhere"))
    (newest / "sharded" / "__0_0.distcp").write_bytes(b"damaged")  # used if "sharded/" is read
    rehash_sharded(newest)
    with pytest.raises(CheckpointError, match="shards do not load|cannot be loaded|refused"):
        trainer_for(tmp_path / "other", steps=3, sharded=True, load=str(newest)).train()
    edit_manifest(newest, lambda m: m["directories"].update({"../../elsewhere": m["directories"].pop("sharded")}))
    with pytest.raises(CheckpointError, match="never writes"):
        checkpoint.load_checkpoint(newest, sharded=True)


def test_unlisted_or_linked_files_in_sharded_are_refused(sharded_run):
    newest = sharded_run / "step_000000002"
    (newest / "sharded" / "extra.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="does not list: 'extra.distcp'"):
        checkpoint.load_checkpoint(newest, sharded=True)
    (newest / "sharded" / "extra.distcp").unlink()
    shard = newest / "sharded" / "__0_0.distcp"
    copy = sharded_run.parent / "copy.distcp"
    shutil.move(shard, copy)
    shard.symlink_to(copy)
    with pytest.raises(CheckpointError, match="symbolic link"):
        checkpoint.load_checkpoint(newest, sharded=True)


# =========================================================================== 2. contents


@pytest.fixture
def saved(tmp_path) -> Path:
    trainer = trainer_for(tmp_path, steps=2)
    trainer.train()
    return tmp_path / "checkpoints" / "step_000000002"


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.update(extra={"$dtype": "load"}), r"\$dtype tag 'load' is not a dtype"),
        (lambda s: s.update(extra={"$dtype": "os"}), r"\$dtype tag 'os'"),
        (lambda s: s.update(extra={"$numpy": ["|V300000000", 0]}), r"only bool, int and float"),
        (lambda s: s.update(extra={"$numpy": ["|O", 0]}), r"only bool, int and float"),
        (lambda s: s.update(extra={"$numpy": ["<i1", 1000]}), r"does not fit int8"),
        (lambda s: s.update(extra={"$numpy": ["<f8", "1.0"]}), r"is not a float64"),
        (lambda s: s.update(extra={"$float": "1e400"}), r"\$float tag"),
        (lambda s: s.update(extra={"$size": [-1]}), r"\$size tag"),
        (lambda s: s.update(extra={"$device": "cuda:x"}), r"\$device tag"),
        (lambda s: s.update(extra={"$tensor": "model.safetensors"}), r"malformed tensor reference"),
        (lambda s: s.update(extra={"$unknown": 1}), r"unknown tag"),
        (lambda s: s.update(extra={"$dict": [[[1], 2]]}), r"cannot be a dict key"),
        (lambda s: s.update(twin=s["model"]["0.weight"]), r"referred to twice"),
    ],
    ids=["dtype-function", "dtype-module", "numpy-void", "numpy-object", "numpy-overflow", "numpy-str",
         "float-word", "size-negative", "device", "tensor-ref", "unknown-tag", "dict-key", "tensor-twice"],
)
def test_crafted_skeleton_tags_are_refused(saved, change, match):
    edit_manifest(saved, lambda m: change(m["state"]))
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load_checkpoint(saved)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m.update(step=-1), r"step is -1"),
        (lambda m: (m.update(step=-5), m["state"].update(step=-5)), r"step is -5"),
        (lambda m: m["state"].update(step=7), r"step does not match"),
        (lambda m: m["state"].update(epoch=-2), r"state\['epoch'\] is -2"),
        (lambda m: m["state"].update(batch_in_epoch=True), r"batch_in_epoch"),
        (lambda m: m["state"].update(world_size=0), r"world_size"),
        (
            lambda m: m["files"].update({"../model.safetensors": m["files"]["model.safetensors"]}),
            r"outside the checkpoint",
        ),
    ],
    ids=[
        "manifest-step",
        "negative-step",
        "step-mismatch",
        "negative-epoch",
        "bool-counter",
        "world-zero",
        "file-outside",
    ],
)
def test_crafted_counters_and_names_are_refused_before_anything_is_assigned(saved, tmp_path, change, match):
    edit_manifest(saved, change)
    trainer = trainer_for(tmp_path / "other", steps=3, load=str(saved))
    trainer.build()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(CheckpointError, match=match):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert trainer.step == 0


def wider_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def test_a_model_of_other_shapes_is_refused_naming_key_and_shapes(saved, tmp_path):
    trainer = trainer_for(tmp_path / "other", steps=3, load=str(saved), model=wider_model())
    with pytest.raises(
        CheckpointError, match=r"model\.0\.weight has shape \(8, 4\) in the checkpoint, but \(16, 4\) here"
    ) as info:
        trainer.train()
    assert str(saved) in str(info.value)
    assert trainer.step == 0


def test_optimizer_moments_of_another_shape_are_refused(saved, tmp_path):
    trainer = trainer_for(tmp_path / "a", steps=2)
    trainer.build()
    state = checkpoint.load_checkpoint(saved)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(
        CheckpointError, match=r"optimizer\.state\.0\.exp_avg has shape \(3,\) in the checkpoint, but \(8, 4\) here"
    ):
        trainer.load_state_dict(state)
    state = checkpoint.load_checkpoint(saved)
    state["optimizer"]["param_groups"][0]["params"].append(99)
    with pytest.raises(CheckpointError, match=r"param_groups\[0\] has 5 parameters, the optimizer's 4"):
        trainer.load_state_dict(state)


def test_a_run_falls_back_past_a_newest_checkpoint_that_does_not_fit(tmp_path, caplog):
    trainer_for(tmp_path, steps=2).train()
    root = tmp_path / "checkpoints"
    other = make_trainer(regression_batches(6, 8), optimizer="adam", max_steps=5, model=wider_model())
    other.train()
    checkpoint.save_checkpoint(other.state_dict(), root)  # step 5 of another model, in this run's directory
    resumed = trainer_for(tmp_path, steps=4)
    with caplog.at_level(logging.WARNING, logger="mini_trainer"):
        resumed.train()
    assert resumed.hooks[0].resumed_from.name == "step_000000002"
    assert "step_000000005" in caplog.text
    assert "has shape (16, 4) in the checkpoint, but (8, 4) here" in caplog.text


# =========================================================================== symbolic links


def test_links_inside_a_checkpoint_root_are_not_followed(tmp_path, caplog):
    trainer_for(tmp_path / "ws", steps=2).train()
    trainer_for(tmp_path / "outside", steps=4).train()
    root = tmp_path / "ws" / "checkpoints"
    foreign = tmp_path / "outside" / "checkpoints" / "step_000000004"
    # A step directory that is a link: not a checkpoint of this root.
    (root / "step_000000009").symlink_to(foreign, target_is_directory=True)
    # `latest` as a link to a file elsewhere naming it.
    (tmp_path / "pointer").write_text("step_000000009\n")
    (root / "latest").unlink()
    (root / "latest").symlink_to(tmp_path / "pointer")
    with caplog.at_level(logging.WARNING, logger="mini_trainer"):
        found, state = checkpoint.find_latest(root)
    assert found.name == "step_000000002" and state["step"] == 2
    assert "symbolic link" in caplog.text
    # A file that is a link (here to a byte-identical copy, so its hash matches).
    model_file = root / "step_000000002" / "model.safetensors"
    copy = tmp_path / "model-copy.safetensors"
    shutil.copy(model_file, copy)
    model_file.unlink()
    model_file.symlink_to(copy)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a symbolic link"):
        checkpoint.load_checkpoint(root / "step_000000002")
    assert checkpoint.prune_checkpoints(root, keep_last=1) == []  # never deletes through a link
    assert foreign.is_dir()


def test_a_fifo_in_place_of_a_file_is_refused_without_waiting(tmp_path):
    # Opening a FIFO for reading waits for a writer: a crafted manifest.json or model file
    # that is one would have hung every resume. It is refused at once instead.
    import threading

    trainer_for(tmp_path / "ws", steps=2).train()
    directory = tmp_path / "ws" / "checkpoints" / "step_000000002"
    for name in ("manifest.json", "model.safetensors"):
        saved = (directory / name).read_bytes()
        (directory / name).unlink()
        os.mkfifo(directory / name)
        outcome: list[BaseException] = []
        worker = threading.Thread(target=lambda found=outcome: found.append(_raised(checkpoint.load_checkpoint,
                                                                                    directory)), daemon=True)
        worker.start()
        worker.join(timeout=20)
        if worker.is_alive():  # unblock the reader so the test process can end, then fail
            with open(directory / name, "wb"):
                pass
            pytest.fail(f"loading a checkpoint whose {name} is a FIFO hangs")
        assert isinstance(outcome[0], CheckpointError) and "not a regular file" in str(outcome[0]), outcome
        (directory / name).unlink()
        (directory / name).write_bytes(saved)


def _raised(function, *args) -> BaseException | None:
    try:
        function(*args)
    except BaseException as err:  # noqa: BLE001 - returned to the test
        return err
    return None


# =========================================================================== safetensors


def safetensors_bytes(header, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = {
    "header-list": safetensors_bytes([]),
    "entry-list": safetensors_bytes({"a": [1, 2]}),
    "negative-shape": safetensors_bytes({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [8, 4]}}, b"\0" * 8),
    "negative-dims": safetensors_bytes({"a": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, b"\0" * 16),
    "deep-nesting": safetensors_bytes(None, raw_header=b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "negative-offset": safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8),
    "overlap": safetensors_bytes({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12),
    "hole": safetensors_bytes({"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, b"\0" * 20),
    "duplicate-key": safetensors_bytes(
        None, b"\0" * 8, raw_header=b'{"a":' + json.dumps(F32).encode() + b',"a":' + json.dumps(F32).encode() + b"}"
    ),
    "unknown-dtype": safetensors_bytes({"a": {**F32, "dtype": "F128"}}, b"\0" * 8),
    "huge-header": (2**62).to_bytes(8, "little") + b"{}",
    "trailing-data": safetensors_bytes({"a": F32}, b"\0" * 12),
    "metadata-not-strings": safetensors_bytes({"__metadata__": {"format": 1}, "a": F32}, b"\0" * 8),
    "bool-shape": safetensors_bytes({"a": {**F32, "shape": [True, True]}}, b"\0" * 8),
    "past-the-end": safetensors_bytes({"a": {**F32, "data_offsets": [0, 8]}}, b"\0" * 4),
    "missing-field": safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
    "not-json": safetensors_bytes(None, raw_header=b"\xff\xfe"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_every_malformed_safetensors_file_is_a_checkpoint_error(tmp_path, name):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(MALFORMED[name])
    with pytest.raises(CheckpointError, match=rf"{name}\.safetensors"):
        checkpoint.read_safetensors(path)


def test_a_valid_file_still_reads(tmp_path):
    path = tmp_path / "ok.safetensors"
    data = torch.tensor([1.0, 2.0]).numpy().tobytes()
    path.write_bytes(
        safetensors_bytes(
            {"__metadata__": {"format": "pt"}, "a": F32, "e": {"dtype": "I8", "shape": [0], "data_offsets": [8, 8]}},
            data,
        )
    )
    tensors = checkpoint.read_safetensors(path)
    assert torch.equal(tensors["a"], torch.tensor([1.0, 2.0])) and tensors["e"].shape == (0,)


def test_weights_only_pickles_in_a_pt_file_are_still_accepted(tmp_path):
    buffer = io.BytesIO()
    torch.save({"step": 1, "model": {}, "optimizer": {}}, buffer)
    (tmp_path / "state.pt").write_bytes(buffer.getvalue())
    assert checkpoint.load_checkpoint(tmp_path / "state.pt")["step"] == 1
