"""Mixed precision: "bf16" autocasts forward; "fp16" also scales the loss with a
GradScaler that skips steps whose gradients overflow. Both work on a CPU too.

    python examples/mixed_precision.py
"""

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseTrainer
from mini_trainer.datasets import digits_loaders


def forward_fn(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float(), y), {"logits_dtype_is_low": float(logits.dtype != torch.float32)}


if __name__ == "__main__":
    for precision in ("bf16", "fp16"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        trainer = BaseTrainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
                              forward_fn=forward_fn, mixed_precision=precision)
        metrics = trainer.fit(digits_loaders()["train"], epochs=3)
        scaler = trainer.grad_scaler
        print(precision, {k: round(v, 4) for k, v in metrics.items() if k in ("loss", "logits_dtype_is_low")},
              "grad scaler:", None if scaler is None else f"scale {scaler.get_scale():.0f}")
