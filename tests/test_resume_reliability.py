"""Kill real training processes and check that resuming loses nothing.

Every test runs tests/scripts/resumable_run.py (dropout, a shuffled StatefulDataLoader whose
epochs straddle accumulation steps, an LR schedule, AdamW, EMA) in subprocesses, kills it
with real signals, starts it again with the same command, and compares the final
checkpoint files byte for byte with those of a run that was never interrupted.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mini_trainer import checkpoint

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "resumable_run.py"
STEPS = 30
FINAL = checkpoint.checkpoint_name(STEPS)
FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(workspace: Path, *args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(workspace), "--steps", str(STEPS), *args],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    if check_rc is not None:
        assert result.returncode == check_rc, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _reap():
    """A failing test must not leave a training process group behind."""
    yield
    while _started:
        process = _started.pop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def start(workspace: Path, *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(workspace), "--steps", str(STEPS), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True,  # its own process group, as a job under a scheduler
    )
    _started.append(process)
    return process


def read_until(process: subprocess.Popen, predicate) -> list[str]:
    lines = []
    for line in process.stdout:
        lines.append(line.strip())
        if predicate(lines):
            return lines
    raise AssertionError(f"the run ended before the expected output; got {lines}\n{process.stderr.read()}")


def assert_same_final_files(reference: Path, workspace: Path) -> None:
    for name in FILES:
        expected = (reference / "checkpoints" / FINAL / name).read_bytes()
        got = (workspace / "checkpoints" / FINAL / name).read_bytes()
        assert got == expected, f"{name} differs from the uninterrupted run's"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    workspace = tmp_path_factory.mktemp("uninterrupted")
    run(workspace)
    return workspace


def kill_points(seed: int) -> list[tuple[int, str]]:
    """Six SIGKILL points: an epoch boundary inside an accumulation step (step 6 draws the
    last batch of epoch 0 and the first of epoch 1), the step after an epoch's exact end
    (step 11 ends epoch 1; the run killed at 12 saves at 11, so the next one resumes from
    a checkpoint taken at the very end of an epoch), and four random ones (steps and
    phases), in the order a run meets them."""
    rng = random.Random(seed)
    steps = rng.sample([s for s in range(2, STEPS) if s not in (6, 11, 12)], 4)
    points = [(6, "fwd1"), (12, "fwd0")] + [(s, rng.choice(["fwd0", "fwd1", "after"])) for s in steps]
    return sorted(points)


def test_sigkill_at_six_points_then_resume_gives_identical_files(uninterrupted, tmp_path):
    seed = int(os.environ.get("RESUME_TEST_SEED", "20261122"))
    points = kill_points(seed)
    for step, phase in points:
        interval = "11" if step == 12 else "4"
        result = run(tmp_path, "--interval", interval, "--kill", f"{step}:{phase}", check_rc=-signal.SIGKILL)
        printed = result.stdout.splitlines()
        assert f"step {step}" not in printed and (step == 1 or printed[-1] == f"step {step - 1}"), printed
    run(tmp_path)
    print(f"kill points {points} (seed {seed}; set RESUME_TEST_SEED to try others)")
    assert_same_final_files(uninterrupted, tmp_path)


def evaluations(output: str) -> tuple[int, dict[int, str]]:
    """(the step a run started from, {step: val/loss} of each evaluation it printed)."""
    lines = output.splitlines()
    start = next(int(line.split()[1]) for line in lines if line.startswith("start "))
    return start, {int(line.split()[1]): line.split()[2] for line in lines if line.startswith("eval ")}


def test_evaluation_schedule_and_results_survive_sigkills(uninterrupted, tmp_path):
    """With an EvalHook (every 4 steps, every epoch's end, the end), runs killed mid-epoch,
    right after an evaluation that was never checkpointed, and in an epoch's last step
    evaluate on resume at exactly the uninterrupted run's steps with the same values, and
    evaluating changes nothing in training: the final files equal those of a run without
    evaluation."""
    reference = tmp_path / "reference"
    start, expected = evaluations(run(reference, "--eval").stdout)
    # every 4 steps, and the steps that end epochs of 11 batches at 2 batches a step; the end is 28
    assert start == 0 and sorted(expected) == [4, 6, 8, 11, 12, 16, 17, 20, 22, 24, 28, 30]
    workspace = tmp_path / "killed"
    seen: dict[int, str] = {}
    for point in ("8:after", "13:fwd0", "17:fwd1"):
        result = run(workspace, "--eval", "--interval", "3", "--kill", point, check_rc=-signal.SIGKILL)
        start, got = evaluations(result.stdout)
        step, phase = point.split(":")
        done = int(step) if phase == "after" else int(step) - 1  # the last step that finished
        assert got == {s: v for s, v in expected.items() if start < s <= done}, (point, got)
        seen.update(got)
    start, got = evaluations(run(workspace, "--eval", "--interval", "3").stdout)
    assert got == {s: v for s, v in expected.items() if s > start}
    assert seen | got == expected
    assert_same_final_files(uninterrupted, workspace)
    assert_same_final_files(uninterrupted, reference)


def test_sigkill_with_asynchronous_saves(uninterrupted, tmp_path):
    # The background writer may be mid-write at any of these kills.
    for point in ("5:fwd0", "13:fwd1", "25:after"):
        run(tmp_path, "--async-save", "--interval", "2", "--kill", point, check_rc=-signal.SIGKILL)
    run(tmp_path, "--async-save", "--interval", "2")
    assert_same_final_files(uninterrupted, tmp_path)


def test_sigkill_with_loader_workers(uninterrupted, tmp_path):
    for point in ("9:fwd1", "20:after"):
        run(tmp_path, "--workers", "2", "--kill", point, check_rc=-signal.SIGKILL)
    run(tmp_path, "--workers", "2")
    assert_same_final_files(uninterrupted, tmp_path)


# fsync order while step 8's checkpoint is written: the three tensor files (in parallel),
# manifest.json, the temporary directory, the checkpoint root after the rename, the new
# `latest` file, and the root again after `latest` is replaced. The process kills itself
# right after the N-th one, so the point is exact whatever the machine's load.
@pytest.mark.parametrize("fsyncs_done, expected_step", [(2, 4), (5, 4), (6, 8), (7, 8)])
def test_sigkill_while_a_checkpoint_is_written(uninterrupted, tmp_path, fsyncs_done, expected_step):
    result = run(tmp_path, "--kill-after-fsync", f"8:{fsyncs_done}", check_rc=-signal.SIGKILL)
    assert "killed after fsync of" in result.stdout
    root = tmp_path / "checkpoints"
    pointed = root / (root / "latest").read_text().strip()
    assert checkpoint.load_checkpoint(pointed)["step"] in (4, 8)  # `latest` always names a valid checkpoint
    found, state = checkpoint.find_latest(root)
    assert state["step"] == expected_step
    result = run(tmp_path)
    assert result.stdout.split("\n")[0] == f"step {expected_step + 1}"
    assert_same_final_files(uninterrupted, tmp_path)


def test_sigterm_saves_the_step_reached_exits_143_and_resumes(uninterrupted, tmp_path):
    process = start(tmp_path, "--interval", "100")
    read_until(process, lambda lines: "step 5" in lines)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    last_step = max(int(line.split()[1]) for line in ["step 5", *out.splitlines()] if line.startswith("step "))
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path / "checkpoints")] == [last_step]
    assert "SIGTERM received" in err and "exiting with code 143" in err
    result = run(tmp_path, "--interval", "100")
    assert result.stdout.split("\n")[0] == f"step {last_step + 1}"
    assert_same_final_files(uninterrupted, tmp_path)


def test_sigterm_to_the_process_group_with_loader_workers(uninterrupted, tmp_path):
    # Schedulers signal the whole group: the loader's workers get SIGTERM too.
    process = start(tmp_path, "--interval", "100", "--workers", "2")
    read_until(process, lambda lines: "step 9" in lines)
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    last_step = max(int(line.split()[1]) for line in ["step 9", *out.splitlines()] if line.startswith("step "))
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path / "checkpoints")] == [last_step]
    run(tmp_path, "--interval", "100", "--workers", "2")
    assert_same_final_files(uninterrupted, tmp_path)


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
    shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
    damaged = tmp_path / "checkpoints" / FINAL / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    result = run(tmp_path)
    assert "sha256 does not match" in result.stderr and FINAL in result.stderr
    assert "resuming from" in result.stderr and "step_000000028" in result.stderr
    assert result.stdout.split("\n")[:2] == ["step 29", "step 30"]
    assert_same_final_files(uninterrupted, tmp_path)
