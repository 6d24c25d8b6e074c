"""The ready-objects API: hand BaseTrainer a model, an optimizer and a forward function,
then `fit()` for some epochs and read back the averaged metrics.

    python examples/ready_objects_fit.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseTrainer
from mini_trainer.datasets import digits_loaders


def forward_fn(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(1) == y).float().mean()}


if __name__ == "__main__":
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    trainer = BaseTrainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), forward_fn=forward_fn)
    loaders = digits_loaders(batch_size=64)
    for _ in range(3):
        metrics = trainer.fit(loaders["train"], epochs=2)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
