"""Checkpoints and exact resume: train, get "preempted", continue with the same command.

The first call trains 150 steps and stops as if the machine went away (a preemption sends
SIGTERM: CheckpointingHook would finish the step, save and exit with code 143). The second
call, with the same code, finds the checkpoint, restores everything (weights, AdamW state,
schedule, data position and order, RNG, EMA) and trains to 300. The last line compares the
result with a run that was never interrupted: the weights are identical, bit for bit.

    python examples/checkpoint_resume.py [WORKSPACE]
"""

import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseTrainer, CheckpointingHook, EmaHook
from mini_trainer.datasets import digits_loaders
from mini_trainer.schedules import warmup_cosine


class Digits(BaseTrainer):
    def build_model(self):
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=3e-3)

    def build_data_loader(self):
        return digits_loaders(batch_size=32)["train"]  # a StatefulDataLoader: resumes mid-epoch

    def build_lr_scheduler(self):
        return warmup_cosine(self.optimizer, warmup_steps=20, total_steps=300)

    def forward(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y), {}


def run(workspace: Path, max_steps: int) -> Digits:
    ema = EmaHook(decay=0.95)
    trainer = Digits(
        max_steps=max_steps,
        seed=0,
        workspace=workspace,
        hooks=[CheckpointingHook(interval=50, keep_previous=2, path="checkpoints"), ema],
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    run(root / "interrupted", max_steps=150)  # "preempted" after step 150
    resumed = run(root / "interrupted", max_steps=300)  # same command, longer budget: resumes at 150
    hook = resumed.hooks[0] if isinstance(resumed.hooks[0], CheckpointingHook) else resumed.hooks[1]
    print("resumed from", hook.resumed_from.name)
    straight = run(root / "straight", max_steps=300)
    same = all(
        torch.equal(a, b)
        for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True)
    )
    print("checkpoints:", ", ".join(p.name for p in sorted((root / "interrupted" / "checkpoints").glob("step_*"))))
    print("identical to the uninterrupted run:", same)
