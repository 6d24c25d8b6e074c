"""The command line, run for real in subprocesses (`python -m mini_trainer ...` and the
installed `mini-trainer` console script)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import unwritable_directory

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/digits_mlp.py"
TIMEOUT = 120


def run_cli(*args: str, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    cmd = (exe or [sys.executable, "-m", "mini_trainer"]) + list(args)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)


# =========================================================================== help


def test_help_exits_zero_and_describes_train():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: mini-trainer" in proc.stdout
    assert "train" in proc.stdout
    assert "trainer.max_steps=" in proc.stdout  # shows an override example


def test_train_help_explains_overrides():
    proc = run_cli("train", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "CONFIG" in out and "KEY=VALUE" in out
    assert "key.path=value" in out
    assert "trainer.hooks.0.interval=5" in out  # list items by index
    assert "--print-config" in out and "--no-eval" in out


def test_no_command_prints_help_and_fails():
    proc = run_cli()
    assert proc.returncode == 2
    assert "usage: mini-trainer" in proc.stdout + proc.stderr


def test_console_script_help():
    script = Path(sys.executable).parent / ("mini-trainer.exe" if os.name == "nt" else "mini-trainer")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    proc = run_cli("--help", exe=[str(script)])
    assert proc.returncode == 0, proc.stderr
    assert "usage: mini-trainer" in proc.stdout


# =========================================================================== train


@pytest.mark.slow
def test_train_digits_end_to_end(tmp_path):
    """The main job: train with evaluation on a validation split every 50 steps, keep the
    best checkpoint, then score the best weights on the untouched test split."""
    proc = run_cli(
        "train",
        CONFIG,
        "trainer.max_steps=300",
        f"trainer.workspace={tmp_path}",
        "trainer.hooks.0.interval=100",
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()

    progress = [line for line in lines if line.startswith("Step ") and ": eval " not in line]
    assert [line.split(":")[0] for line in progress] == ["Step 100/300", "Step 200/300", "Step 300/300"]
    assert all(" loss " in line and " samples/s " in line for line in progress)
    evaluations = [line for line in lines if ": eval " in line]
    assert [line.split(":")[0] for line in evaluations] == [f"Step {s}/300" for s in range(50, 301, 50)]
    assert all(re.search(r" val/loss \d\.\d{4} val/accuracy 0\.\d{4}$", line) for line in evaluations)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r and "test/loss" not in r}
    assert sorted(val) == list(range(50, 301, 50))
    best_step = min(val, key=val.get)
    best = [line for line in lines if line.startswith("best checkpoint: ")]
    assert best == [f"best checkpoint: {tmp_path}/checkpoints/step_{best_step:09d} "
                    f"(step {best_step}, val/loss {val[best_step]:.4f})"]

    match = re.search(r"^test_accuracy (0\.\d{4})$", proc.stdout, re.M)
    assert match and lines[-1] == match.group(0), proc.stdout  # the best weights' test accuracy ends it
    assert float(match.group(1)) > 0.9
    assert any(re.match(r"^ema_test_accuracy 0\.\d{4}$", line) for line in lines)  # the EmaHook, scored too
    assert any(re.match(r"^test_loss \d+\.\d{4}$", line) for line in lines)
    # The final results are logged at the step of the weights they score (the best one).
    final = [r for r in records if "test/accuracy" in r]
    assert len(final) == 1 and final[0]["step"] == best_step
    assert final[0]["test/accuracy"] == pytest.approx(float(match.group(1)), abs=1e-4)
    assert final[0]["val/loss"] == pytest.approx(val[best_step], abs=1e-9)  # the same weights as then

    train_steps = [r["step"] for r in records if "loss" in r]
    assert len(set(train_steps)) == len(train_steps) and train_steps == sorted(train_steps)
    assert train_steps[-1] == 300
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    # keep_previous=2 newest (saves at 300 and at each new best), and the best, never pruned
    assert {f"step_{best_step:09d}", "step_000000300"} <= set(kept) and len(kept) <= 3, kept
    assert (tmp_path / "checkpoints" / "best").read_text().strip() == f"step_{best_step:09d}"

    # `mini-trainer plot` draws the run's curves (train and val share the loss and accuracy panels)
    plotted = run_cli("plot", str(tmp_path), "--metrics", "loss,accuracy", "-o", str(tmp_path / "curves.png"))
    assert plotted.returncode == 0 and plotted.stdout.strip() == str(tmp_path / "curves.png"), plotted.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unknown = run_cli("plot", str(tmp_path), "--metrics", "val/perplexity")
    assert unknown.returncode == 2 and "val/perplexity" in unknown.stderr and "val/loss" in unknown.stderr

    # The same command with a bigger budget continues from the latest checkpoint (not the best).
    again = run_cli(
        "train", CONFIG, "trainer.max_steps=400", f"trainer.workspace={tmp_path}", "trainer.hooks.0.interval=100"
    )
    assert again.returncode == 0, again.stderr
    steps = [line.split(":")[0] for line in again.stdout.splitlines() if line.startswith("Step ")]
    assert steps == ["Step 350/400", "Step 400/400", "Step 400/400"]  # two evaluations, one progress line
    # nothing is written into the repository's default workspace by this run
    assert not (tmp_path / "runs").exists()


def test_print_config_reflects_overrides(tmp_path):
    proc = run_cli(
        "train", "--print-config", CONFIG,
        "trainer.max_steps=7", "trainer.optimizer_cfg.lr=3e-4", "trainer.hooks.1.interval=9",
        f"trainer.workspace={tmp_path}", "trainer.model_cfg.hidden_sizes=[32]",
    )
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    trainer = cfg["trainer"]
    assert trainer["type"] == "ClassificationTrainer"
    assert trainer["max_steps"] == 7
    assert trainer["optimizer_cfg"] == {"type": "torch.optim.AdamW", "lr": 3e-4, "weight_decay": 1e-2}
    assert trainer["hooks"][1] == {"type": "LoggingHook", "interval": 9}
    assert trainer["hooks"][0]["interval"] == 100
    assert trainer["workspace"] == str(tmp_path)
    assert trainer["model_cfg"]["hidden_sizes"] == [32]
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing was trained


def test_options_between_config_and_overrides():
    # `mini-trainer train CONFIG --print-config key=value` is the natural way to type it;
    # the overrides after the option must still be applied (argparse needs
    # parse_intermixed_args for a nargs="*" positional after an option).
    proc = run_cli("train", CONFIG, "--print-config", "trainer.max_steps=7")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["trainer"]["max_steps"] == 7


# =========================================================================== errors


@pytest.mark.parametrize(
    "args, needle",
    [
        ([CONFIG, "trainer.max_steps"], "'trainer.max_steps'"),
        ([CONFIG, "trainer.nope.lr=1"], "'nope'"),
        (["configs/does_not_exist.py"], "does_not_exist.py"),
        (["configs/digits_mlp.yaml"], ".py"),
    ],
    ids=["no-equals", "missing-key", "missing-file", "not-python"],
)
def test_errors_exit_2_with_message_on_stderr(args, needle):
    proc = run_cli("train", *args)
    assert proc.returncode == 2, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "mini-trainer: error:" in proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not proc.stdout.strip()



@pytest.mark.parametrize(
    "case, needle",
    [
        ("deep-override", "too deeply nested"),
        ("workspace-file", "workspace"),
        ("workspace-5000", "workspace"),
        ("workspace-nul", "NUL byte"),
        ("cuda-on-cpu", "CUDA, which is not available"),
        ("seed-range", "seed must be an integer in"),
        ("checkpoints-unwritable", "cannot write checkpoints to"),
        ("checkpoints-dev-null", "cannot write checkpoints to '/dev/null'"),
        ("load-missing", "no checkpoint at"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, case, needle):
    """Every mistake in the input is reported before training starts, in one line."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    ws = f"trainer.workspace={tmp_path / 'ws'}"
    if case == "cuda-on-cpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    args = {
        "deep-override": lambda: [ws, "trainer.grad_clip=" + "-" * 100_000 + "1"],
        "workspace-file": lambda: [f"trainer.workspace={a_file}"],
        "workspace-5000": lambda: [f"trainer.workspace={tmp_path / ('w' * 5000)}"],
        "workspace-nul": lambda: [f"trainer.workspace='{tmp_path}/w\\x00s'"],  # a Python literal with a NUL
        "cuda-on-cpu": lambda: [ws, "trainer.device='cuda'"],
        "seed-range": lambda: [ws, "trainer.seed=" + str(2**64)],
        "checkpoints-unwritable": lambda: [ws, f"trainer.hooks.2.path={unwritable_directory(tmp_path)}"],
        "checkpoints-dev-null": lambda: [ws, "trainer.hooks.2.path=/dev/null"],
        "load-missing": lambda: [ws, f"trainer.hooks.2.load={tmp_path / 'nothing'}"],
    }[case]()
    proc = run_cli("train", CONFIG, "trainer.max_steps=60", *args)
    assert proc.returncode == 2, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mini-trainer: error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    assert len(errors[0]) < 2100
    assert not (tmp_path / "ws" / "metrics.jsonl").exists()  # no step was trained


HOLD_LOCK = """
import sys, time
from mini_trainer.checkpoint import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_run_in_a_locked_directory_is_refused_naming_the_holder(tmp_path):
    (tmp_path / "ws" / "checkpoints").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "ws" / "checkpoints")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_cli("train", CONFIG, "trainer.max_steps=60", f"trainer.workspace={tmp_path / 'ws'}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"in use by another run (pid {holder.pid} on host" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    proc = run_cli("train", CONFIG, "trainer.max_steps=60", f"trainer.workspace={tmp_path / 'ws'}", "--no-eval")
    assert proc.returncode == 0, proc.stderr[-3000:]  # a killed holder does not block the next run


def test_config_without_a_limit_is_a_usage_error(tmp_path):
    config = tmp_path / "nolimit.py"
    config.write_text(
        "trainer = dict(type='ClassificationTrainer', model_cfg=dict(type='MLP', in_features=64, out_features=10),\n"
        "               optimizer_cfg=dict(type='torch.optim.SGD', lr=0.1), data_cfg=dict(type='digits_loaders'))\n"
    )
    proc = run_cli("train", str(config))
    assert proc.returncode == 2
    assert "max_steps or max_epochs" in proc.stderr and "Traceback" not in proc.stderr
