"""A checkpoint written before the redesign (tests/fixtures/v1_checkpoint, FORMAT_VERSION 1)
still loads, and the run resumed from it ends bit for bit where an uninterrupted run does."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch

from mini_trainer import EmaHook, checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_v1_checkpoint", FIXTURES / "make_v1_checkpoint.py")
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)


def test_fixture_is_a_valid_version_1_checkpoint():
    state = checkpoint.load_checkpoint(FIXTURES / "v1_checkpoint" / "checkpoints" / "step_000000003")
    assert checkpoint.FORMAT_VERSION == 1
    assert state["step"] == fixture.STEPS_SAVED
    assert state["hooks"]["ema"]["updates"] == fixture.STEPS_SAVED


def test_old_checkpoint_resumes_exactly(tmp_path):
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(FIXTURES / "v1_checkpoint", resumed_dir)
    resumed = fixture.make_trainer(resumed_dir, fixture.STEPS_TOTAL)
    resumed.train()
    straight = fixture.make_trainer(tmp_path / "straight", fixture.STEPS_TOTAL, load=None)
    straight.train()

    assert resumed.step == straight.step == fixture.STEPS_TOTAL
    for (name, a), b in zip(resumed.model.state_dict().items(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(resumed.optimizer.state.values(), straight.optimizer.state.values(), strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    ema = [h for h in resumed.hooks if isinstance(h, EmaHook)][0].ema_model.state_dict()
    ema_straight = [h for h in straight.hooks if isinstance(h, EmaHook)][0].ema_model.state_dict()
    assert all(torch.equal(ema[k], ema_straight[k]) for k in ema)
    assert resumed.lr_scheduler.state_dict() == straight.lr_scheduler.state_dict()
