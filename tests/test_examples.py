"""Every example runs on its own and prints what its docstring promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_example(name: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / name)], cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_subclass_example_learns_digits():
    out = run_example("subclass_digits.py")
    accuracy = float(re.search(r"^test_accuracy (\d\.\d{4})$", out, re.M).group(1))
    assert accuracy > 0.93


@pytest.mark.slow
def test_gradient_accumulation_example_matches_the_big_batch():
    out = run_example("gradient_accumulation.py")
    assert float(out.strip().rsplit(" ", 1)[1]) < 1e-5


@pytest.mark.slow
def test_ready_objects_example_improves_every_fit():
    out = run_example("ready_objects_fit.py")
    losses = [float(x) for x in re.findall(r"'loss': ([\d.]+)", out)]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]


@pytest.mark.slow
def test_mixed_precision_example_uses_low_precision_and_a_scaler_for_fp16():
    out = run_example("mixed_precision.py")
    assert re.search(r"^bf16 .*'logits_dtype_is_low': 1.0.*grad scaler: None$", out, re.M)
    assert re.search(r"^fp16 .*'logits_dtype_is_low': 1.0.*grad scaler: scale \d+$", out, re.M)


@pytest.mark.slow
def test_custom_hook_example_stops_early():
    out = run_example("custom_hook.py")
    step = int(re.search(r"stopped at step (\d+)", out).group(1))
    assert 0 < step < 10_000


@pytest.mark.slow
def test_checkpoint_example_resumes_to_identical_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "checkpoint_resume.py"), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "resumed from step_000000150" in proc.stdout
    assert "checkpoints: step_000000250, step_000000300" in proc.stdout
    assert proc.stdout.strip().endswith("identical to the uninterrupted run: True")


@pytest.mark.slow
def test_spela_example_learns_digits_at_every_exit():
    out = run_example("spela_digits.py")
    accuracies = dict(line.split() for line in out.strip().splitlines())
    assert set(accuracies) == {"exit_1_accuracy", "exit_2_accuracy", "exit_3_accuracy", "accuracy"}
    assert float(accuracies["accuracy"]) > 0.93


@pytest.mark.slow
def test_distributed_example_runs_on_one_process_too():
    out = run_example("distributed_torchrun.py")
    assert "processes 1 parallel None" in out
    assert float(re.search(r"^test_accuracy (\d\.\d{4})$", out, re.M).group(1)) > 0.93


@pytest.mark.slow
def test_phase_example_skips_most_backward_passes_and_learns():
    out = run_example("phase_digits.py")
    steps, with_backward = map(int, re.search(r"^steps (\d+) with_backward (\d+)", out, re.M).groups())
    assert with_backward < 0.5 * steps
    assert float(re.search(r"^test_accuracy (\d\.\d{4})$", out, re.M).group(1)) > 0.93


@pytest.mark.slow
def test_surprise_repair_lm_example_reports_both_runs_and_samples():
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "surprise_repair_lm.py"), "steps=30", "model.hidden=32"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    losses = re.findall(r"^held_out_loss (baseline|surprise_repair) (\d+\.\d+)$", proc.stdout, re.M)
    assert [name for name, _ in losses] == ["baseline", "surprise_repair"]
    assert all(0 < float(value) < 5 for _, value in losses)
    fired, injected, seen = map(
        int, re.search(r"^trigger fired (\d+) injected (\d+) of (\d+)", proc.stdout, re.M).groups()
    )
    assert fired > 0 and 0 < injected <= 0.03 * seen
    assert len(re.findall(r"^sample (plain|sandwich) \d: ", proc.stdout, re.M)) == 4


@pytest.mark.slow
def test_stream_example_stops_early_both_ways(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "stream_digits.py"), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    epochs = int(re.search(r"^epochs (\d+), best val_loss", out, re.M).group(1))
    assert 5 < epochs < 100  # early stopping ended the endless epoch stream
    assert float(re.search(r"^epoch_stream test_accuracy (\d\.\d{4})$", out, re.M).group(1)) > 0.93
    assert float(re.search(r"^trainer.events test_accuracy (\d\.\d{4})$", out, re.M).group(1)) > 0.93
    stopped = int(re.search(r"^stopped at step (\d+);", out, re.M).group(1))
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert stopped < 2000 and len(lines) == stopped // 20  # one line per evaluated event, written as it came
    assert (tmp_path / "checkpoints" / f"step_{stopped:09d}").is_dir()  # the final checkpoint of a stream-stopped run


@pytest.mark.slow
def test_wandb_images_example_logs_offline_and_resumes_the_same_run(tmp_path):
    from PIL import Image

    # No credentials anywhere (a fresh HOME): the hook's offline default is what is tested.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true")
    workspace = tmp_path / "ws"
    for steps in ("300", "500"):
        proc = subprocess.run(
            [sys.executable, str(REPO / "examples" / "wandb_images.py"), str(workspace), steps],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr
    run_ids = re.findall(r"^wandb run (\w+):", proc.stdout, re.M)
    runs = sorted(p.name for p in (workspace / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {name.rsplit("-", 1)[1] for name in runs} == set(run_ids)  # one run id, resumed
    assert sorted(int(p.name) for p in (workspace / "images").iterdir()) == [100, 200, 300, 400, 500]
    files = sorted((workspace / "images" / "500" / "test").glob("mistakes_*.png"))
    assert 1 <= len(files) <= 8 and Image.open(files[0]).size == (8, 8)
