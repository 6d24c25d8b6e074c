"""PhaseTrainer: most steps use a predicted gradient instead of a backward pass.

    python examples/phase_digits.py

Trains the digits MLP for 1000 steps with the default phases (warmup 10, then cycles of 5
full steps and 20 predicted ones with a correction every 5), prints how many steps ran a
backward pass, the prediction quality measured on correction steps, and the test accuracy.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer.datasets import digits_loaders
from mini_trainer.strategies import PhaseConfig, PhaseTrainer


class DigitsPhase(PhaseTrainer):
    def build_data_loader(self):
        self.loaders = digits_loaders(batch_size=64)
        return self.loaders["train"]

    def build_model(self):
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    def build_optimizer(self):
        return torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def forward(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y), {}


if __name__ == "__main__":
    trainer = DigitsPhase(max_steps=1000, seed=0, phase=PhaseConfig(seed=0))
    trainer.train()
    stats = trainer.get_stats()
    print(f"steps {stats['total_steps']} with_backward {stats['total_steps'] - stats['predict_steps']} "
          f"speedup {stats['speedup']:.2f} prediction_cosine {stats.get('mean_correct_cosine', float('nan')):.3f}")
    x, y = trainer.loaders["test"].dataset.tensors
    with torch.no_grad():
        accuracy = (trainer.model(x.to(trainer.device)).argmax(1).cpu() == y).float().mean().item()
    print(f"test_accuracy {accuracy:.4f}")
