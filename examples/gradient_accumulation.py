"""Gradient accumulation: 4 micro-batches of 16 give the same update as one batch of 64
(the loss is scaled by 1/4; with DDP the all-reduce runs only on the last micro-batch).

    python examples/gradient_accumulation.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseTrainer


def run(batch_size: int, accumulation: int) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(256, 8, generator=g), torch.randn(256, 1, generator=g)
    batches = [(data[0][i : i + batch_size], data[1][i : i + batch_size]) for i in range(0, 256, batch_size)]
    trainer = BaseTrainer(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=batches,
        forward_fn=lambda m, b: F.mse_loss(m(b[0]), b[1]),
        gradient_accumulation_steps=accumulation,
        max_steps=4,
    )
    trainer.train()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


if __name__ == "__main__":
    big, accumulated = run(64, 1), run(16, 4)
    print("max |difference| between the two runs:", (big - accumulated).abs().max().item())
