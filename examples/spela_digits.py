"""SPELA: train an MLP with local per-layer losses and a single forward pass (no backprop).

Each layer learns to point its output at a fixed unit vector of the sample's class; no
gradient crosses layers, and every layer is an exit: the printout shows the test accuracy
of each one. This is the seed project's direct API (`SpelaTrainer(model, layers,
activations, config)`); `configs/digits_spela.py` builds the same from a config.

    python examples/spela_digits.py
"""

import torch
from torch import nn

from mini_trainer.datasets import digits_loaders
from mini_trainer.strategies import SpelaConfig, SpelaTrainer


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 512)
        self.fc2 = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, 34)  # wider than the 10 classes, as in the paper


if __name__ == "__main__":
    torch.manual_seed(0)
    model = MLP()
    layers = [model.fc1, model.fc2, model.fc3]
    activations = [nn.ReLU(), nn.ReLU(), None]
    trainer = SpelaTrainer(model, layers, activations, SpelaConfig(num_classes=10, lr=5e-2), seed=0)
    loaders = digits_loaders(batch_size=32)
    trainer.fit(loaders["train"], epochs=30)
    for name, accuracy in trainer.evaluate(loaders["test"]).items():
        print(f"{name} {accuracy:.4f}")
