"""Code written for the `mini.trainer` seed (../shared/seeds/mini-trainer-README.txt) runs
with only its import lines pointed at `mini_trainer`: its Quick Tour trainer with hooks and
a `log` override, and its utilities, through `sys.modules` aliases (what
docs/coming_from.md tells users to do with a search and replace instead)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import mini_trainer
from mini_trainer import builder, config, utils

QUICK_TOUR = '''
from mini.trainer import BaseTrainer, ProgressHook, CheckpointingHook, LoggingHook
import torch
import torch.nn as nn

class MyTrainer(BaseTrainer):
    def build_data_loader(self):
        # Return any iterable (DataLoader, generator, etc.)
        dataset = torch.utils.data.TensorDataset(torch.randn(256, 784), torch.randint(0, 10, (256,)))
        return torch.utils.data.DataLoader(dataset, batch_size=32)

    def build_model(self):
        model = nn.Sequential(
            nn.Linear(784, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
        return model.to(self.device)

    def build_optimizer(self):
        return torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def forward(self, input):
        # Implement your forward pass and loss computation
        x, y = input
        x, y = x.to(self.device), y.to(self.device)
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits, y)

        # Return loss and a dict of metrics to log
        records = {"accuracy": (logits.argmax(1) == y).float().mean().item()}
        return loss, records

    def build_hooks(self):
        return [
            ProgressHook(interval=10, with_records=True),
            CheckpointingHook(interval=1000, path=self.workspace / "checkpoints"),
            LoggingHook(interval=100),
        ]

    def log(self, records, dry_run=False):
        # Called by LoggingHook to log aggregated metrics
        print(f"Step {self.step}: {records}")

trainer = MyTrainer(
    max_steps=20,
    grad_clip=1.0,
    max_non_finite_grad_retries=3,
    mixed_precision="bf16",  # or "fp16", or None
    gradient_accumulation_steps=4,
    workspace=WORKSPACE,
    device="cpu",
)

trainer.train()
'''

UTILITIES = '''
from mini.trainer import map_nested_tensor

input = {"x": torch.randn(2, 3), "y": [torch.randn(4, 5)]}
output = map_nested_tensor(lambda t: t.to("cpu"), input)

from mini.trainer.utils import key_average

records = [
    {"loss": 0.5, "metrics": {"acc": 0.9}},
    {"loss": 0.6, "metrics": {"acc": 0.85}},
]
avg = key_average(records)
'''


@pytest.fixture
def mini_aliases(monkeypatch):
    """`mini.trainer`, `mini.trainer.utils`, `mini.builder`, `mini.config` -> mini_trainer."""
    package = type(sys)("mini")
    package.trainer, package.builder, package.config = mini_trainer, builder, config
    for name, module in {"mini": package, "mini.trainer": mini_trainer, "mini.trainer.utils": utils,
                         "mini.builder": builder, "mini.config": config}.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_quick_tour_with_hooks_and_a_log_override(mini_aliases, tmp_path, capsys):
    # The seed's blocks 1 and 3 joined; its placeholders (`dataset = ...`, 10_000 steps on
    # "cuda", ./runs/experiment_1) replaced by a small dataset, 20 steps, the CPU, tmp_path.
    namespace = {"WORKSPACE": str(tmp_path)}
    exec(compile(textwrap.dedent(QUICK_TOUR), "quick_tour", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.step == 20 and (tmp_path / "checkpoints" / "step_000000020").is_dir()
    printed = capsys.readouterr().out
    assert "Step 20: {" in printed and "'accuracy'" in printed  # the log() override got LoggingHook's records


def test_utilities(mini_aliases):
    namespace = {"torch": torch}
    exec(compile(textwrap.dedent(UTILITIES), "utilities", "exec"), namespace)
    assert namespace["avg"] == {"loss": 0.55, "metrics": {"acc": 0.875}}
    assert torch.equal(namespace["output"]["y"][0], namespace["input"]["y"][0])
