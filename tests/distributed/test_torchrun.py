"""Distributed training as users run it: real `torchrun` processes on CPU (gloo).

Every test starts `tests/distributed/dist_run.py` (a small MLP, its data read through
`mini_trainer.data.tensor_loader`) under torchrun with 2 processes, or as one plain process
for the reference. The global batch is the same everywhere: 2 ranks x 4 samples, or 1
process x 8 samples. Each launch is bounded in time and its whole process group is killed
if it overruns.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("dist_run.py")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 180


def launch(command: list[str], timeout: float = TIMEOUT) -> tuple[int, str]:
    """Run `command` in its own process group; kill it and every process it started if it
    overruns (torchrun starts each worker in a session of its own: killing torchrun's group
    would leave a hung worker holding the output pipe, and this wait, open forever)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(command)} ran past {timeout}s:\n{output[-4000:]}")
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
    return process.returncode, output


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`'s process group and all its descendants (found before any dies: an
    orphan's parent becomes init)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    descendants, queue = [], list(children.get(pid, []))
    while queue:
        current = queue.pop()
        descendants.append(current)
        queue += children.get(current, [])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    for descendant in descendants:
        with contextlib.suppress(ProcessLookupError):
            os.kill(descendant, signal.SIGKILL)


TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(workspace: Path, *args: str, nproc: int = 2, expect_rc: int | None = 0, restarts: int = 0) -> str:
    for stale in [workspace / "final.safetensors", *(workspace / f"rank{r}.json" for r in range(nproc))]:
        stale.unlink(missing_ok=True)  # left by an earlier run in this workspace
    launcher = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        f"--max-restarts={restarts}",
    ]
    rc, output = launch([*launcher, str(SCRIPT), str(workspace), *args])
    finished = (
        all((workspace / f"rank{r}.json").exists() for r in range(nproc)) and (workspace / "final.safetensors").exists()
    )
    if expect_rc == 0 and rc != 0 and TEARDOWN_ABORT in output and finished:
        # Seen twice in ~150 launches on this machine, never reproduced on purpose: a C++
        # abort while a process exits, after the run finished and wrote everything (see
        # the README's known issues). What the tests check is intact, so it is not a failure.
        warnings.warn(f"torchrun run finished, then a process aborted at exit ({TEARDOWN_ABORT})", stacklevel=2)
        return output
    if expect_rc is not None:
        assert rc == expect_rc, f"torchrun exited with {rc}:\n{output[-6000:]}"
    return output


def single(workspace: Path, *args: str) -> str:
    rc, output = launch([sys.executable, str(SCRIPT), str(workspace), *args])
    assert rc == 0, f"exited with {rc}:\n{output[-6000:]}"
    return output


def weights(workspace: Path) -> dict[str, torch.Tensor]:
    return load_file(str(workspace / "final.safetensors"))


def ranks(workspace: Path, nproc: int = 2) -> list[dict]:
    return [json.loads((workspace / f"rank{r}.json").read_text()) for r in range(nproc)]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------- same math as one process

EQUIVALENCE = ["--steps", "10", "--clip", "0.5"]


@pytest.fixture(scope="module")
def one_process_big_batch(tmp_path_factory) -> dict[str, torch.Tensor]:
    """No accumulation, the whole global batch (2 ranks x 4 samples x 2 micro-steps)."""
    workspace = tmp_path_factory.mktemp("reference")
    single(workspace, *EQUIVALENCE, "--batch", "16")
    return weights(workspace)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_evaluation_early_stopping_and_best_checkpoint_equal_one_process(tmp_path, parallelism):
    """2 processes: evaluate() equals 1 process to 1e-6 on splits of 23 (batches of 5) and 7
    samples; early stopping ends both ranks at the step one process stops at; the best
    checkpoint is the same step (and val/loss) as in one process. Under FSDP2 ranks with
    fewer evaluation batches keep joining the others' all-gathers."""
    args = ["--steps", "60", "--eval", "3", "--early-stop", "1:0.002", "--keep-best"]
    single(tmp_path / "one", *args, "--batch", "8")
    torchrun(tmp_path / "two", *args, "--parallelism", parallelism)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    two = ranks(tmp_path / "two")
    assert one["step"] < 60, "early stopping must end the run for this test to mean something"
    assert two[0]["step"] == two[1]["step"] == one["step"]
    for rank in two:
        assert [s for s, _ in rank["evaluations"]] == [s for s, _ in one["evaluations"]]
        for (_, got), (_, expected) in zip(rank["evaluations"], one["evaluations"], strict=True):
            assert got.keys() == expected.keys() == {"val/loss", "val/rank", "test/loss", "test/rank"}
            assert all(abs(got[k] - expected[k]) < 1e-6 for k in ("val/loss", "test/loss")), (got, expected)
            # forward's `rank` record, averaged over samples: the share of each split that rank 1
            # scored (val: batches 1 and 3 of 5, 10 of 23 samples; test: 3 of 7), so every sample
            # counted exactly once
            assert (got["val/rank"], got["test/rank"]) == pytest.approx((10 / 23, 3 / 7), abs=1e-12)
            assert (expected["val/rank"], expected["test/rank"]) == (0, 0)
        assert all(abs(rank["evaluate"][k] - one["evaluate"][k]) < 1e-6 for k in ("val/loss", "test/loss"))
    best_one = (tmp_path / "one" / "ckpt" / "best").read_text()
    assert (tmp_path / "two" / "ckpt" / "best").read_text() == best_one
    manifests = [json.loads((tmp_path / run / "ckpt" / best_one.strip() / "manifest.json").read_text())
                 for run in ("one", "two")]
    assert abs(manifests[0]["best"]["value"] - manifests[1]["best"]["value"]) < 1e-6
    difference = max(abs(two[0]["evaluate"][k] - one["evaluate"][k]) for k in ("val/loss", "test/loss"))
    print(f"{parallelism}: stopped at {one['step']}, best {best_one.strip()}, 1 vs 2 processes "
          f"max |difference| {difference:.2e}")


def test_trainer_events_under_ddp_stop_every_rank_at_the_same_step(tmp_path, one_process_big_batch):
    """No step limit: take(10) on the event stream ends the run on both ranks, which then
    write their final checkpoint together; the math is the one-process run's."""
    torchrun(tmp_path, *EQUIVALENCE, "--events", "10", "--accum", "2", "--parallelism", "ddp", "--interval", "100")
    assert [info["step"] for info in ranks(tmp_path)] == [10, 10]
    assert max_difference(weights(tmp_path), one_process_big_batch) < 1e-6
    assert (tmp_path / "ckpt" / "step_000000010").is_dir()


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_with_accumulation_equal_one_process(tmp_path, one_process_big_batch, parallelism):
    torchrun(tmp_path, *EQUIVALENCE, "--batch", "4", "--accum", "2", "--parallelism", parallelism, "--count-comm")
    # Same weights: the data was sharded (DistributedSampler), gradients averaged over
    # ranks and micro-steps, and clipped by the global norm (clip 0.5 is active here).
    assert max_difference(weights(tmp_path), one_process_big_batch) < 1e-6
    for info in ranks(tmp_path):
        assert info["world"] == 2 and info["parallel"] == parallelism
        assert info["sampler"] == "EpochShuffleSampler"
        counts = info["comm_per_micro_step"]
        assert len(counts) == 20
        # No gradient all-reduce / reduce-scatter on the first micro-step of a step, some
        # on the second (DDP: one bucket; FSDP2: one reduce-scatter per sharded unit).
        assert counts[0::2] == [0] * 10, counts
        assert all(c > 0 for c in counts[1::2]), counts


def test_fsdp_accumulation_when_the_data_ends_mid_step(tmp_path):
    """One epoch of 12 batches per rank with 5 micro-steps per step: the third step has
    only 2, and its last one must still reduce-scatter the gradients (FSDP2 cannot sync
    them afterwards)."""
    single(tmp_path / "one", "--epochs", "1", "--accum", "5", "--batch", "8")
    torchrun(tmp_path / "two", "--epochs", "1", "--accum", "5", "--batch", "4", "--parallelism", "fsdp")
    assert [info["step"] for info in ranks(tmp_path / "two")] == [3, 3]
    assert max_difference(weights(tmp_path / "two"), weights(tmp_path / "one")) < 1e-6


# ---------------------------------------------------------------- ranks agree


@pytest.mark.parametrize("parallelism", ["ddp", "none"])
def test_nan_or_stop_on_one_rank_is_followed_by_every_rank(tmp_path, parallelism):
    """Rank 1 alone gets a NaN loss at step 3, and rank 0 alone asks to stop after step 5:
    both ranks retry step 3 and both stop after step 5 (a rank acting alone would leave the
    other waiting in a collective forever). With parallelism='none' nothing syncs the
    gradients, so the trainer's own agreement is what is tested."""
    torchrun(tmp_path, "--steps", "8", "--parallelism", parallelism, "--nan", "1:3", "--stop", "0:5")
    for info in ranks(tmp_path):
        assert info["step"] == 5
        assert [s["retries"] for s in info["seen"]] == [0, 0, 1, 0, 0]


def test_a_checkpoint_write_failing_on_rank_zero_stops_every_rank(tmp_path):
    """Rank 1 must not wait forever for a checkpoint rank 0 could not write."""
    output = torchrun(
        tmp_path, "--steps", "8", "--interval", "2", "--parallelism", "ddp", "--fail-write", "0", expect_rc=None
    )
    assert "No space left on device (simulated)" in output
    assert "another rank failed while saving or loading a checkpoint" in output
    assert not (tmp_path / "rank0.json").exists() and not (tmp_path / "rank1.json").exists()


def test_synced_metrics_are_logged_once_by_rank_zero(tmp_path):
    output = torchrun(tmp_path, "--steps", "6", "--parallelism", "ddp", "--metrics")
    rank_losses = [[s["loss"] for s in info["seen"]] for info in ranks(tmp_path)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6]  # written by one rank only
    for line in lines:
        step = line["step"]
        window = [losses[i] for losses in rank_losses for i in (step - 2, step - 1)]
        assert line["loss"] == pytest.approx(sum(window) / len(window), rel=1e-6)
        assert line["rank"] == pytest.approx(0.5)  # records are averaged over ranks too
    assert sum(1 for line in output.splitlines() if line.startswith("Step ")) == 3  # printed once


# ---------------------------------------------------------------- exact resume

RESUMABLE = [
    "--steps", "12", "--interval", "4", "--dropout", "0.1", "--optimizer", "adamw", "--accum", "2",
    "--parallelism", "ddp", "--ema",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    workspace = tmp_path_factory.mktemp("uninterrupted")
    torchrun(workspace, *RESUMABLE)
    return weights(workspace)


def test_sigterm_and_sigkill_on_one_rank_then_resume_exactly(tmp_path, uninterrupted):
    """Dropout masks differ per rank, so each rank's RNG must come back as its own."""
    run = tmp_path / "run"
    # SIGTERM to rank 1 only during step 6: both ranks finish the step, save, exit 143.
    output = torchrun(run, *RESUMABLE, "--sigterm", "1:6", expect_rc=None)
    assert "exitcode  : 143" in output
    assert (run / "ckpt" / "step_000000006").is_dir()
    # SIGKILL on rank 0 after step 10 (last checkpoint: 8): torchrun stops rank 1 too.
    output = torchrun(run, *RESUMABLE, "--sigkill", "0:10", expect_rc=None)
    assert "SIGKILL" in output
    torchrun(run, *RESUMABLE)
    final, expected = weights(run), uninterrupted
    assert final.keys() == expected.keys()
    for name in expected:  # model and EMA, bit for bit
        assert torch.equal(final[name], expected[name]), name


def test_torchrun_restarts_after_a_rank_dies_anywhere_and_resumes_exactly(tmp_path, uninterrupted):
    """One torchrun launch with --max-restarts: in each attempt a rank dies at another point.
    The other rank must exit at once (its collective fails; no barrier at exit after an
    error), the restarted group must form (torchrun gives every attempt the same store: a
    rank reading the previous attempt's addresses failed or hung), and the run must end as
    if it never stopped. Checkpoints every 4 steps of 12."""
    kills = [
        "0:1:6:forward",  # mid-step, rank 0 in DDP's all-reduce: resumes from step 4
        "1:0:8:write",  # rank 0 writing checkpoint 8, rank 1 waiting for it: from 4 again
        "2:1:10:allreduce",  # rank 0 blocked in the all-reduce for 1 s: from 8
        "3:0:11:raise",  # an exception, rank 1 blocked in DDP's all-reduce: from 8
    ]
    output = torchrun(tmp_path, *RESUMABLE, "--kill-at", ",".join(kills), restarts=len(kills))
    assert output.count("KILL rank") == len(kills)
    assert "forcefully exiting" not in output  # no survivor needed SIGKILL after torchrun's SIGTERM
    final = weights(tmp_path)
    assert final.keys() == uninterrupted.keys()
    for name in uninterrupted:  # model and EMA, bit for bit
        assert torch.equal(final[name], uninterrupted[name]), name


# ---------------------------------------------------------------- other numbers of processes

MOVABLE = ["--interval", "3", "--optimizer", "adamw", "--accum", "2", "--clip", "1.0"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> dict[str, torch.Tensor]:
    workspace = tmp_path_factory.mktemp("one_process")
    single(workspace, *MOVABLE, "--steps", "12", "--batch", "8")
    return weights(workspace)


@pytest.mark.parametrize(
    "parallelism, sharded",
    [("ddp", False), ("fsdp", False), ("fsdp", True)],
    ids=["ddp", "fsdp-full", "fsdp-sharded"],
)
def test_resume_from_two_processes_onto_one_and_back(tmp_path, one_process_run, parallelism, sharded):
    """2 processes to step 4 (the sharded run is SIGKILLed after step 5 instead: its last
    checkpoint is step 3), then 1 process to step 9, then 2 processes to step 12. Every
    hand-over falls in the middle of an epoch (6 steps each), so the data position must
    carry over in samples of the epoch's permutation."""
    options = [*MOVABLE, "--parallelism", parallelism, *(["--sharded"] if sharded else [])]
    if sharded:
        output = torchrun(tmp_path, *options, "--steps", "12", "--sigkill", "1:5", expect_rc=None)
        assert "SIGKILL" in output
        assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_000000003"
        manifest = json.loads((tmp_path / "ckpt" / "step_000000003" / "manifest.json").read_text())
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(manifest["directories"]["sharded"])
    else:
        torchrun(tmp_path, *options, "--steps", "4")
    single(tmp_path, *options, "--steps", "9", "--batch", "8")
    torchrun(tmp_path, *options, "--steps", "12")
    assert max_difference(weights(tmp_path), one_process_run) < 1e-6


# ---------------------------------------------------------------- the command line


def test_cli_runs_unchanged_under_torchrun(tmp_path):
    rc, output = launch([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "mini_trainer", "train", "configs/digits_mlp.py",
        f"trainer.workspace={tmp_path}", "trainer.max_steps=150",
    ])
    assert rc == 0, output[-6000:]
    accuracy = [line for line in output.splitlines() if line.startswith("test_accuracy ")]
    assert len(accuracy) == 1, output[-3000:]  # printed by rank 0 only
    assert float(accuracy[0].split()[1]) > 0.9
    assert (tmp_path / "checkpoints" / "step_000000150").is_dir()
