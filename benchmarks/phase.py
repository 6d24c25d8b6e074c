"""PhaseTrainer (`mini_trainer.strategies.PhaseTrainer`) against plain backprop: wall time
to the same training loss, backward passes, test accuracy.

Two tasks, each trained twice in this one process with the same seed, data order and
optimizer (Adam 1e-3, batch 64, one CPU thread), once by `BaseTrainer` (backprop every
step) and once by `PhaseTrainer` with its default `PhaseConfig` (warmup 10, full 5,
predict 20, correct every 5, least squares over 8 gradients):
  - "digits": scikit-learn digits, MLP 64-256-256-10 (`--steps`, default 1500).
  - "cnn": the same 8x8 images through a small CNN (conv 1->32->64->64, 3x3, ReLU, then a
    linear layer to 10), where backward is most of a step and the optimizer is cheap
    (`--cnn-steps`, default 600). (A deep MLP was tried first: there Adam's update of its
    6.3M parameters cost twice the backward pass, which capped any gain at ~17%.)
Each run records every step's training loss (on the device, read once at the end) and the
wall clock after every step. The target is the baseline's final training loss, smoothed
(mean of its last 50 steps); "time to loss" is the wall time at which a run's 50-step
moving average first reaches it. Printed: one JSON object with, for the digits task,
`backward_ratio` (PhaseTrainer's backward passes / the baseline's), `speedup_to_loss`
(baseline time / PhaseTrainer time to the target, 0 if never reached), `acc_baseline`,
`acc_phase` (test accuracy), and the same for the CNN under `cnn_*`, plus the
raw times and `prediction_cosine`: the mean cosine similarity between the predicted and the
real gradient on CORRECT steps (how predictable the gradients were).

    python benchmarks/phase.py [--steps 1500] [--cnn-steps 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseHook, BaseTrainer
from mini_trainer.datasets import digits_loaders
from mini_trainer.strategies import PhaseTrainer

WINDOW = 50


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Linear(64 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)).flatten(1))


def train(kind: str, architecture: str, steps: int, seed: int) -> dict:
    loaders = digits_loaders(batch_size=64, seed=0)
    torch.manual_seed(seed)
    model = mlp([64, 256, 256, 10]) if architecture == "mlp" else SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses: list[torch.Tensor | None] = []
    clock: list[float] = []

    def forward(model: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    class Record(BaseHook):  # only on_after_step: the trainer calls nothing else of it
        def on_after_step(self, t: BaseTrainer) -> None:
            losses.append(t.step_info["loss"])
            clock.append(time.perf_counter())

    common = dict(model=model, optimizer=optimizer, data_loader=loaders["train"], forward_fn=forward,
                  max_steps=steps, device="cpu", seed=seed, grad_clip=1.0, hooks=[Record()])
    trainer = BaseTrainer(**common) if kind == "baseline" else PhaseTrainer(**common)
    trainer.build()
    start = time.perf_counter()
    trainer.train()
    times = [c - start for c in clock]
    # With skip_forward a PREDICT step has no loss: it counts as the last one measured.
    known = [loss for loss in losses if loss is not None]
    values = torch.stack([loss.float() for loss in known]).tolist() if known else []
    filled, last = [], float("nan")
    it = iter(values)
    for loss in losses:
        last = next(it) if loss is not None else last
        filled.append(last)
    values = filled
    x, y = loaders["test"].dataset.tensors
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    backward = steps if kind == "baseline" else trainer.controller.backward_steps
    cosine = None if kind == "baseline" else trainer.get_stats().get("mean_correct_cosine")
    return {"losses": values, "times": times, "accuracy": accuracy, "backward": backward, "total": times[-1],
            "cosine": cosine}


def moving_average(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= WINDOW:
            total -= values[i - WINDOW]
        out.append(total / min(i + 1, WINDOW))
    return out


def time_to(target: float, run: dict) -> float | None:
    for i, value in enumerate(moving_average(run["losses"])):
        if i + 1 >= WINDOW and value <= target:
            return run["times"][i]
    return None


def compare(architecture: str, steps: int, seed: int) -> dict:
    baseline = train("baseline", architecture, steps, seed)
    phase = train("phase", architecture, steps, seed)
    target = moving_average(baseline["losses"])[-1]
    reached = time_to(target, phase)
    return {
        "backward_ratio": round(phase["backward"] / baseline["backward"], 4),
        "speedup_to_loss": round(baseline["total"] / reached, 4) if reached else 0.0,
        "acc_baseline": round(baseline["accuracy"], 4),
        "acc_phase": round(phase["accuracy"], 4),
        "target_loss": round(target, 5),
        "phase_final_loss": round(moving_average(phase["losses"])[-1], 5),
        "baseline_s": round(baseline["total"], 3),
        "phase_s": round(phase["total"], 3),
        "phase_time_to_loss_s": round(reached, 3) if reached else None,
        "step_time_ratio": round(phase["total"] / baseline["total"], 4),
        "prediction_cosine": round(phase["cosine"], 4) if phase["cosine"] is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--cnn-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    digits = compare("mlp", args.steps, args.seed)
    cnn = compare("cnn", args.cnn_steps, args.seed)
    print(json.dumps({**digits, **{f"cnn_{k}": v for k, v in cnn.items()},
                      "steps": args.steps, "cnn_steps": args.cnn_steps}))


if __name__ == "__main__":
    main()
