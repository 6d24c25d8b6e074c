"""SpiralFastLoop's Quickstart and trigger hook on mini_trainer: the seed's code with only
its imports changed to `mini_trainer.compat.spiralfastloop`. One epoch of the synthetic
MLP (98 steps of 2 x 256 samples), then 40 steps with a loss-std trigger that injects each
batch's hardest samples again; prints both metric dicts and the trigger's counters.

    python examples/spiralfastloop_quickstart.py
"""

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from mini_trainer.compat.spiralfastloop import FastTrainer, LossStdConfig, LossStdTrigger, dataloader_from_dataset


def my_provider(k, device, ctx):
    """SpiralFastLoop's provider signature: k extra samples, here the batch's k hardest."""
    loss_vec = ctx["loss_vec"]
    inputs, targets = ctx["inputs"], ctx["targets"]
    idx = loss_vec.topk(min(k, loss_vec.numel())).indices
    return inputs[idx], targets[idx]


def rounded(metrics):
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items() if not isinstance(v, dict)}


if __name__ == "__main__":
    torch.manual_seed(0)
    X = torch.randn(50_000, 128)
    y = torch.randint(0, 10, (50_000,))
    loader = dataloader_from_dataset(TensorDataset(X, y), batch_size=256, device="auto")

    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)

    trainer = FastTrainer(model, opt, grad_accum=2, log_interval=50)
    print("quickstart", rounded(trainer.train_one_epoch(loader, nn.CrossEntropyLoss(), steps=200)))

    trigger = LossStdTrigger(my_provider, LossStdConfig(std_threshold=0.15, inject_ratio=0.08))
    trainer = FastTrainer(model, opt, trigger_hook=trigger, log_interval=20)
    metrics = trainer.train_one_epoch(loader, nn.CrossEntropyLoss(reduction="none"), steps=40)
    print("trigger", rounded(metrics))
    print(f"trigger fired {metrics['trigger_fired']} injected {metrics['trigger_injected']} "
          f"of {metrics['trigger_seen']} samples seen")
