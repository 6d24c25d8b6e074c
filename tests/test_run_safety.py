"""A run protects what it writes and fails early: one run per checkpoint directory (a
crashed holder never blocks a restart), unusable directories and arguments are refused
before the first step, and every hook gets to clean up when the run ends badly."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import make_trainer, regression_batches, unwritable_directory
from mini_trainer import BaseHook, BaseTrainer, CheckpointingHook, LoggingHook
from mini_trainer.checkpoint import CheckpointDirectoryError, DirectoryLock

REPO = Path(__file__).resolve().parents[1]


def trainer_in(workspace: Path, steps: int = 3, *hooks: BaseHook, **kwargs):
    checkpointing = kwargs.pop("checkpointing", None) or CheckpointingHook(interval=1)
    return make_trainer(
        regression_batches(4, 8), max_steps=steps, workspace=workspace, hooks=[checkpointing, *hooks], **kwargs
    )


# =========================================================================== the lock


def test_a_second_run_in_the_same_directory_fails_at_once(tmp_path):
    first = trainer_in(tmp_path, steps=10)
    events = first.events()
    next(events)  # the first run is training (suspended after its first step)
    second = trainer_in(tmp_path, steps=10)
    with pytest.raises(
        CheckpointDirectoryError,
        match=rf"'{re.escape(str(tmp_path / 'checkpoints'))}' is in use by another run \(pid {os.getpid()} on host",
    ) as info:
        second.train()
    assert "CheckpointingHook(path=...)" in str(info.value)
    assert second.step == 0
    events.close()  # the first run ends normally and lets go
    assert first.step == 1 and (tmp_path / "checkpoints" / "step_000000001").is_dir()
    second.train()  # resumes the first run's checkpoint
    assert second.step == 10 and second.hooks[0].resumed_from.name == "step_000000001"


def test_other_directories_and_runs_after_the_end_are_not_blocked(tmp_path):
    trainer_in(tmp_path / "a").train()
    a_again = trainer_in(tmp_path / "a", steps=5)
    b = trainer_in(tmp_path / "b")
    events = b.events()
    next(events)
    a_again.train()  # another directory: fine while b trains
    events.close()
    assert a_again.step == 5


HOLDER = """
import os, sys, time
from mini_trainer.checkpoint import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
if os.fork() == 0:          # a DataLoader worker, say: outlives its parent for a while
    time.sleep(30)
    os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_killed_holder_never_blocks_the_restart_even_with_children_alive(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointDirectoryError, match=rf"pid {holder.pid} on host"):
            DirectoryLock(root).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        lock = DirectoryLock(root)
        lock.acquire()  # the forked child is still alive, but it closed its copy of the lock
        assert lock.held
        lock.release()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


# =========================================================================== unusable directories


@pytest.mark.parametrize("where", ["unwritable", "a-file", "dev-null", "under-a-file"])
def test_an_unusable_checkpoint_directory_fails_before_the_first_step(tmp_path, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    path = {
        "unwritable": lambda: unwritable_directory(tmp_path),
        "a-file": lambda: a_file,
        "dev-null": lambda: Path("/dev/null"),
        "under-a-file": lambda: a_file / "checkpoints",
    }[where]()
    steps = []

    class Count(BaseHook):
        def on_after_step(self, trainer):
            steps.append(trainer.step)

    trainer = trainer_in(tmp_path / "ws", 3, Count(), checkpointing=CheckpointingHook(interval=None, path=path))
    with pytest.raises(CheckpointDirectoryError, match=rf"cannot write checkpoints to '{re.escape(str(path))}': \w+"):
        trainer.train()
    assert steps == [] and trainer.step == 0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            {"workspace": "/dev/null"},
            ValueError,
            r"workspace '/dev/null' cannot be a directory: it exists and is not a directory",
        ),
        ({"workspace": "w" * 300}, ValueError, r"workspace has a name of 300 bytes"),
        ({"workspace": "w/" * 2500}, ValueError, r"workspace is \d+ bytes long"),
        ({"workspace": "w\x00s"}, ValueError, r"workspace must not contain a NUL byte"),
        ({"workspace": ""}, ValueError, r"workspace must not be empty"),
        ({"seed": 2**64}, ValueError, r"seed must be an integer in -9223372036854775808\.\.18446744073709551615"),
        ({"seed": -(2**63) - 1}, ValueError, r"seed must be an integer in"),
        ({"device": "cuda"}, ValueError, r"device='cuda' asks for CUDA, which is not available here"),
        ({"device": "cuda:3"}, ValueError, r"device='cuda:3' asks for CUDA"),
        ({"device": 0}, ValueError, r"device=0 asks for CUDA"),
        ({"device": "mps"}, ValueError, r"device='mps' asks for Apple's MPS"),
    ],
    ids=["ws-dev-null", "ws-long-name", "ws-long-path", "ws-nul", "ws-empty", "seed-big", "seed-small",
         "cuda", "cuda-index", "cuda-int", "mps"],
)
def test_constructor_arguments_that_cannot_work_here(kwargs, exc, match):
    if "device" in kwargs and (torch.cuda.is_available() or torch.backends.mps.is_available()):
        pytest.skip("this machine has an accelerator")
    with pytest.raises(exc, match=match):
        BaseTrainer(max_steps=1, **kwargs)


def test_a_workspace_whose_parent_is_a_file_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(
        ValueError,
        match=rf"workspace '{re.escape(str(tmp_path / 'f' / 'run'))}' cannot be a directory: "
        rf"its parent '{re.escape(str(tmp_path / 'f'))}' is a file",
    ):
        make_trainer(regression_batches(1, 2), max_steps=1, workspace=tmp_path / "f" / "run")


def test_a_workspace_that_cannot_be_created_is_named_when_built(tmp_path):
    workspace = unwritable_directory(tmp_path) / "run"
    trainer = make_trainer(regression_batches(1, 2), max_steps=1, workspace=workspace)
    with pytest.raises(OSError, match=rf"workspace '{re.escape(str(workspace))}' cannot be created: \w+"):
        trainer.build()


def test_disk_full_during_a_save_names_the_checkpoint(tmp_path, monkeypatch):
    from mini_trainer.checkpoint import safetensors_io

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io, "_write_all", full)
    trainer = trainer_in(tmp_path, 2)
    with pytest.raises(
        OSError,
        match=rf"No space left on device \(while writing checkpoint "
        rf"{re.escape(str(tmp_path / 'checkpoints' / 'step_000000001'))}\)",
    ) as info:
        trainer.train()
    assert info.value.errno == 28
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


# =========================================================================== ending badly


class Boom(Exception):
    pass


class FailingFlush(BaseHook):
    """Like a LoggingHook flushing to a full disk when the run fails."""

    def on_exception(self, trainer, error):
        raise OSError(28, "No space left on device (flushing metrics)")


class Record(BaseHook):
    priority = 50

    def __init__(self):
        self.events = []

    def on_exception(self, trainer, error):
        self.events.append(("on_exception", type(error).__name__))

    def on_after_train(self, trainer):
        self.events.append(("on_after_train", None))


def test_one_failing_on_exception_does_not_stop_the_others(tmp_path, caplog):
    class Crash(BaseHook):
        def on_after_step(self, trainer):
            if trainer.step == 3:  # the save of step 2 may still be in flight
                raise Boom("the step failed")

    handler_before = signal.getsignal(signal.SIGTERM)
    record = Record()
    trainer = trainer_in(
        tmp_path, 5, Crash(), FailingFlush(), record, checkpointing=CheckpointingHook(interval=2, async_save=True)
    )
    with caplog.at_level(logging.ERROR, logger="mini_trainer"), pytest.raises(Boom, match="the step failed"):
        trainer.train()
    assert record.events == [("on_exception", "Boom")]
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the checkpointing hook put it back
    assert (tmp_path / "checkpoints" / "step_000000002").is_dir()  # the save in flight was awaited
    assert "FailingFlush.on_exception also failed" in caplog.text and "flushing metrics" in caplog.text
    trainer_in(tmp_path, 3).train()  # the directory lock was released


def test_every_on_after_train_runs_and_the_first_failure_is_raised(tmp_path):
    class FailingEnd(BaseHook):
        def on_after_train(self, trainer):
            raise OSError(28, "No space left on device (closing a file)")

    record = Record()
    trainer = trainer_in(tmp_path, 2, FailingEnd(), record, LoggingHook(interval=1))
    with pytest.raises(OSError, match="closing a file"):
        trainer.train()
    assert record.events == [("on_after_train", None)]
    assert (tmp_path / "checkpoints" / "step_000000002").is_dir()  # the final save still happened
    trainer_in(tmp_path, 3).train()  # and the lock is free


def test_a_hook_failing_to_start_releases_what_the_others_took(tmp_path):
    class BadStart(BaseHook):
        def on_before_train(self, trainer):
            raise Boom("no connection to the experiment tracker")

    handler_before = signal.getsignal(signal.SIGTERM)
    record = Record()
    with pytest.raises(Boom):
        trainer_in(tmp_path, 2, BadStart(), record).train()
    assert record.events == [("on_exception", "Boom")]
    assert signal.getsignal(signal.SIGTERM) is handler_before
    trainer_in(tmp_path, 2).train()
