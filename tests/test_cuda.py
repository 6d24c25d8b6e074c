"""CUDA paths. CI has no GPU: these skip there and run wherever a GPU is present."""

from __future__ import annotations

import io

import pytest
import torch

from helpers import make_trainer, regression_batches
from mini_trainer import BaseHook, LoggingHook, ProgressHook

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class SyncTrap(BaseHook):
    """Turns CUDA's sync debug mode to "error" for the body of every step, so any
    device-to-host synchronisation the loop makes raises. Reporting hooks run after it
    is switched off (they sync on purpose, at their interval)."""

    priority = -1000

    def on_before_step(self, trainer):
        torch.cuda.set_sync_debug_mode("error")

    def on_after_step(self, trainer):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("precision", [None, "bf16"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_step_makes_no_device_sync(precision, accumulation):
    trainer = make_trainer(
        regression_batches(8, 16),
        optimizer="adam",
        lr=1e-3,
        device="cuda",
        mixed_precision=precision,
        gradient_accumulation_steps=accumulation,
        grad_clip=1.0,
        max_non_finite_grad_retries=None,
        hooks=[SyncTrap(), ProgressHook(interval=3, file=io.StringIO()), LoggingHook(interval=3)],
        max_steps=7,
    )
    try:
        trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.step == 7


def test_auto_device_and_precision_pick_cuda():
    trainer = make_trainer(regression_batches(2, 8), device="auto", mixed_precision="auto", max_steps=2)
    assert trainer.device.type == "cuda"
    assert trainer.autocast_dtype in (torch.bfloat16, torch.float16)
    trainer.train()
    assert next(trainer.model.parameters()).device.type == "cuda"


def test_fp16_on_cuda_trains_with_a_scaler():
    trainer = make_trainer(regression_batches(4, 8), device="cuda", mixed_precision="fp16", max_steps=4)
    trainer.train()
    assert trainer.grad_scaler is not None and trainer.grad_scaler.is_enabled()


def test_memory_hook_reports_cuda_peak(tmp_path):
    from mini_trainer import CudaMaxMemoryHook

    trainer = make_trainer(regression_batches(4, 8), device="cuda", hooks=[CudaMaxMemoryHook()], max_steps=2)
    trainer.train()
    assert "max_rss" not in trainer.step_info
    assert 0 < trainer.step_info["max_memory"] == torch.cuda.max_memory_allocated() / 2**30


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoint_of_a_cuda_run_resumes_exactly(tmp_path, async_save):
    from mini_trainer import CheckpointingHook, EmaHook

    def run(steps, workspace):
        ema = EmaHook(decay=0.5, device="cpu")  # an EMA kept off the GPU
        trainer = make_trainer(
            regression_batches(6, 8), optimizer="adam", lr=1e-2, device="cuda", mixed_precision="bf16",
            workspace=workspace, max_steps=steps,
            hooks=[CheckpointingHook(interval=2, async_save=async_save), ema],
        )
        trainer.train()
        return trainer, ema

    straight, straight_ema = run(6, tmp_path / "a")
    run(3, tmp_path / "b")
    resumed, resumed_ema = run(6, tmp_path / "b")
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert a.device.type == "cuda" and torch.equal(a, b)
    for a, b in zip(straight_ema.ema_model.parameters(), resumed_ema.ema_model.parameters(), strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b)
