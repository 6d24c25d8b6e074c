"""Small builders shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mini_trainer import BaseTrainer


def regression_batches(n_batches: int, batch_size: int, seed: int = 0, features: int = 4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(features, 1, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch_size, features, generator=g)
        out.append((x, x @ w + 0.1 * torch.randn(batch_size, 1, generator=g)))
    return out


def mse_forward(model, batch):
    x, y = batch
    pred = model(x)
    loss = nn.functional.mse_loss(pred, y)
    return loss, {"mae": (pred - y).abs().mean().detach()}


def make_model(seed: int = 0, features: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, 1))


def make_trainer(batches, *, lr: float = 0.1, optimizer: str = "sgd", seed: int = 0, **kwargs) -> BaseTrainer:
    model = kwargs.pop("model", None) or make_model(seed)
    opt_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    opt = opt_cls(model.parameters(), lr=lr)
    kwargs.setdefault("forward_fn", mse_forward)
    kwargs.setdefault("device", "cpu")
    return BaseTrainer(model=model, optimizer=opt, data_loader=batches, **kwargs)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def unwritable_directory(tmp_path: Path) -> Path:
    """An existing directory this process cannot create files in (root ignores file modes,
    so as root: one of /proc's)."""
    if os.geteuid() != 0:
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
        return readonly
    if not os.path.isdir("/proc/self/fdinfo"):
        pytest.skip("needs /proc to find a directory root cannot write")
    return Path("/proc/self/fdinfo")
