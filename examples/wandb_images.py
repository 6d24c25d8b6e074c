"""Weights & Biases and image files: metrics and pictures of the digits the model gets
wrong, logged every 100 steps to a W&B run and to PNG files. With no W&B credentials on
this machine the run is written offline (upload it later with `wandb sync`); with
`wandb login` done, it goes online. Run twice with the same workspace: the second run
resumes from the checkpoint and continues the same W&B run id.

    python examples/wandb_images.py [workspace] [max_steps]
"""

import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseHook, BaseTrainer, CheckpointingHook, ImageFileLoggerHook, LoggingHook, WandbHook
from mini_trainer.datasets import digits_loaders


class DigitsTrainer(BaseTrainer):
    def build_data_loader(self):
        self.loaders = digits_loaders(batch_size=64)
        return self.loaders["train"]

    def build_model(self):
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=3e-3)

    def forward(self, batch):
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits, y), {"accuracy": (logits.argmax(1) == y).float().mean()}


class Mistakes(BaseHook):
    """Every 100 steps: the test digits the model gets wrong, as 8x8 grayscale images."""

    def on_after_step(self, trainer):
        if trainer.step % 100:
            return
        x, y = trainer.loaders["test"].dataset.tensors
        with torch.no_grad():
            wrong = trainer.model(x).argmax(1) != y
        pixels = x[wrong][:8].reshape(-1, 1, 8, 8)  # standardised features, back to 0..1 below
        low, high = pixels.amin(dim=(1, 2, 3), keepdim=True), pixels.amax(dim=(1, 2, 3), keepdim=True)
        trainer.log_images({"test/mistakes": (pixels - low) / (high - low).clamp_min(1e-6)})
        trainer.log({"test/mistakes": wrong.sum()})


if __name__ == "__main__":
    workspace = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="wandb_images_")
    wandb_hook = WandbHook(project="mini-trainer-examples", config={"lr": 3e-3, "batch_size": 64}, tags=["digits"])
    trainer = DigitsTrainer(
        max_steps=300 if (len(sys.argv) < 3) else int(sys.argv[2]),
        seed=0,
        workspace=workspace,
        hooks=[
            LoggingHook(interval=100),
            CheckpointingHook(interval=100),
            wandb_hook,
            ImageFileLoggerHook(interval=100, path="images", max_images=8),
            Mistakes(),
        ],
    )
    trainer.train()
    print(f"wandb run {wandb_hook.run_id}: files in {workspace}/wandb")
    print(f"images in {workspace}/images/<step>/test/mistakes_<i>.png")
