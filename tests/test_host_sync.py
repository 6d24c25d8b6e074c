"""No host sync per step: the framework itself never reads a device value on steps where
no hook reports. Every way of reading one (item, float, int, bool, cpu, tolist, numpy) is
counted when called from mini_trainer's own code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import mini_trainer
from helpers import make_trainer, regression_batches
from mini_trainer import BaseHook, LoggingHook, ProgressHook

PACKAGE = str(Path(mini_trainer.__file__).parent)
READS = ("item", "__float__", "__int__", "__bool__", "cpu", "tolist", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    calls: list[tuple[str, str, int]] = []

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                calls.append((name, Path(caller.f_code.co_filename).name, caller.f_lineno))
            return original(self, *args, **kwargs)

        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    return calls


class PerStepReads(BaseHook):
    """Splits the counted reads by step (runs after every other hook's on_after_step)."""

    priority = 1000

    def __init__(self, calls):
        self.calls, self.per_step, self._mark = calls, [], 0

    def on_before_step(self, trainer):
        self._mark = len(self.calls)

    def on_after_step(self, trainer):
        self.per_step.append([name for name, *_ in self.calls[self._mark :]])


def _train(host_reads, steps, **kwargs):
    import io

    probe = PerStepReads(host_reads)
    trainer = make_trainer(
        regression_batches(8, 8),
        optimizer="adam",
        lr=1e-2,
        hooks=[ProgressHook(interval=5, file=io.StringIO()), LoggingHook(interval=5), probe],
        max_steps=steps,
        **kwargs,
    )
    trainer.train()
    return probe.per_step


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("precision", [None, "bf16", "fp16"])
def test_no_host_reads_between_log_steps_when_unchecked(host_reads, accumulation, precision):
    per_step = _train(host_reads, 6, grad_clip=1.0, max_non_finite_grad_retries=None,
                      gradient_accumulation_steps=accumulation, mixed_precision=precision)
    # fp16: the GradScaler's overflow flag (one read, which GradScaler.step makes anyway).
    own = ["item"] if precision == "fp16" else []
    # Step 5 is the hooks' interval: each reads all its metrics in one tolist().
    assert per_step == [own, own, own, own, own + ["tolist", "tolist"], own]


def test_the_finite_check_is_one_scalar_read_per_step(host_reads):
    per_step = _train(host_reads, 4, grad_clip=1.0)  # default: checked, no retries
    assert per_step == [["__float__"]] * 4
    assert {file for name, file, _ in host_reads if name == "__float__"} == {"trainer.py"}


def test_no_host_reads_per_step_with_mfu_and_a_tokens_record(host_reads):
    import io

    from mini_trainer import MfuHook

    def forward(model, batch):
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        # a count on the device, as a tokenizer's attention mask sum would be
        return loss, {"tokens": (x != 0).sum(), "mae": (model(x) - y).abs().mean().detach()}

    probe = PerStepReads(host_reads)
    hooks = [ProgressHook(interval=5, file=io.StringIO()), LoggingHook(interval=5),
             MfuHook(flops_per_token=1e6, peak_flops=1e12), probe]
    trainer = make_trainer(regression_batches(18, 8), optimizer="adam", lr=1e-2, hooks=hooks, max_steps=6,
                           forward_fn=forward, grad_clip=1.0, max_non_finite_grad_retries=None,
                           gradient_accumulation_steps=3)
    trainer.train()
    # Samples, tokens, FLOPs and MFU ride on the interval's one transfer per hook.
    assert probe.per_step == [[], [], [], [], ["tolist", "tolist"], []]
