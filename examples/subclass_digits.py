"""The subclass API: implement four methods, train, evaluate. Runs in seconds on a CPU.

    python examples/subclass_digits.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseTrainer, ProgressHook
from mini_trainer.datasets import digits_loaders


class DigitsTrainer(BaseTrainer):
    def build_data_loader(self):
        self.loaders = digits_loaders(batch_size=64)
        return self.loaders["train"]

    def build_model(self):
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=3e-3)

    def build_hooks(self):
        return [ProgressHook(interval=100)]

    def forward(self, batch):
        x, y = batch
        logits = self.model(x)
        # Records stay tensors: they are averaged (and synced) only when a hook reports.
        return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(1) == y).float().mean()}


if __name__ == "__main__":
    trainer = DigitsTrainer(max_steps=500, grad_clip=1.0, seed=0)
    trainer.train()
    x, y = trainer.loaders["test"].dataset.tensors
    with torch.no_grad():
        accuracy = (trainer.model(x.to(trainer.device)).argmax(1).cpu() == y).float().mean().item()
    print(f"test_accuracy {accuracy:.4f}")
