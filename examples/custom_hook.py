"""A custom hook: stop early once the logged loss is low enough. Hooks override only the
events they need; their position in the list never matters (see BaseHook.priority).

    python examples/custom_hook.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseHook, BaseTrainer, LoggingHook
from mini_trainer.datasets import digits_loaders


class StopAtLoss(BaseHook):
    def __init__(self, target: float):
        self.target = target

    def on_log(self, trainer, records, dry_run=False):
        # Called with averaged Python floats every LoggingHook interval.
        if records.get("loss", float("inf")) < self.target:
            print(f"step {trainer.step}: loss {records['loss']:.4f} < {self.target}, stopping")
            trainer.should_stop = True


if __name__ == "__main__":
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    trainer = BaseTrainer(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
        data_loader=digits_loaders()["train"],
        forward_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        hooks=[StopAtLoss(0.05), LoggingHook(interval=20)],
        max_steps=10_000,
    )
    trainer.train()
    print("stopped at step", trainer.step)
