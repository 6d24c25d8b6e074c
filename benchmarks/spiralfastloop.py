"""SpiralFastLoop's synthetic benchmark on mini_trainer: samples/s of a hand-written loop,
of `mini_trainer.compat.spiralfastloop.FastTrainer` and of `BaseTrainer`, side by side.

The seed's model and settings: an MLP 128-512-10 (ReLU), AdamW (lr 3e-4), batch 256,
cross-entropy, on the CPU with one thread. Batches are pre-built in memory (nothing hides
a loop's own cost behind data loading). The three run in interleaved rounds inside this
one process, their order rotating every round, so the machine's noise hits all alike;
times are this process's CPU time (`time.process_time`). Each side as its user gets it:

- "plain": forward, loss, backward, `optimizer.step()`, `zero_grad(set_to_none=True)`;
- "fast": `FastTrainer(model, opt, log_interval=50)` with the loss given as `criterion`
  (its defaults: progress every 50 steps, BaseTrainer's non-finite check, no AMP and no
  compile on the CPU);
- "fast_unchecked": the same with `max_non_finite_grad_retries=None` (no finite check:
  no gradient norm and no host read per step, like SpiralFastLoop's own loop);
- "base": `BaseTrainer(model=..., optimizer=..., forward_fn=...)` with the same
  `ProgressHook(interval=50)`.

Ratios are samples/s of one over the other, the median of the per-round ratios:
`fast_vs_plain`, `fast_unchecked_vs_plain`, `base_vs_plain`, `fast_vs_base` (what the compat layer costs over the
BaseTrainer it is), and `plain_vs_plain` (the loop against a second copy of itself: the
noise floor). Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import statistics
import time

import torch
from torch import nn

from mini_trainer import BaseTrainer, ProgressHook
from mini_trainer.compat.spiralfastloop import FastTrainer

BATCH = 256


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 10))


def make_batches(count: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(count * BATCH, 128, generator=g)
    y = torch.randint(0, 10, (count * BATCH,), generator=g)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-4)


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


class PlainLoop:
    """What a careful user writes by hand."""

    def __init__(self, batches) -> None:
        self.model = make_model()
        self.optimizer = optimizer_for(self.model)
        self.batches, self.position = batches, 0

    def run(self, steps: int) -> None:
        model, optimizer, criterion = self.model, self.optimizer, nn.CrossEntropyLoss()
        for _ in range(steps):
            x, y = self.batches[self.position % len(self.batches)]
            self.position += 1
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


class TrainerRun:
    def __init__(self, batches, fast: bool, check: bool = True) -> None:
        model = make_model()
        progress = ProgressHook(interval=50, file=io.StringIO())
        if fast:
            self.trainer = FastTrainer(model, optimizer_for(model), log_interval=50, device="cpu",
                                       criterion=nn.CrossEntropyLoss(), data_loader=batches, hooks=[progress],
                                       max_steps=0, max_non_finite_grad_retries=0 if check else None)
        else:
            self.trainer = BaseTrainer(model=model, optimizer=optimizer_for(model), forward_fn=cross_entropy,
                                       data_loader=batches, hooks=[progress], device="cpu", max_steps=0)

    def run(self, steps: int) -> None:
        self.trainer.max_steps += steps
        self.trainer.train()


def measure(runners: dict[str, object], rounds: int, steps: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-round CPU times of every runner (order rotating), and their median samples/s."""
    for runner in runners.values():
        runner.run(10)  # warm-up: allocator, first-call costs
    gc.collect()
    gc.freeze()  # full collections walk every object torch made at import: keep them out of the rounds
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.process_time()
            runners[name].run(steps)
            times[name].append(time.process_time() - start)
    rates = {name: BATCH * steps / statistics.median(t) for name, t in times.items()}
    return times, rates


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over the rounds of samples/s of `a` over samples/s of `b`."""
    return round(statistics.median(tb / ta for ta, tb in zip(times[a], times[b], strict=True)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = make_batches()
    noise, _ = measure({"plain": PlainLoop(batches), "plain2": PlainLoop(batches)}, args.rounds, args.steps)
    times, rates = measure(
        {"plain": PlainLoop(batches), "fast": TrainerRun(batches, fast=True),
         "fast_unchecked": TrainerRun(batches, fast=True, check=False), "base": TrainerRun(batches, fast=False)},
        args.rounds, args.steps,
    )
    result: dict[str, object] = {
        "name": "spiralfastloop",
        "fast_vs_plain": ratio(times, "fast", "plain"),
        "fast_unchecked_vs_plain": ratio(times, "fast_unchecked", "plain"),
        "base_vs_plain": ratio(times, "base", "plain"),
        "fast_vs_base": ratio(times, "fast", "base"),
        "plain_vs_plain": ratio(noise, "plain2", "plain"),
        **{f"{name}_samples_per_s": round(rate, 1) for name, rate in rates.items()},
        "rounds": args.rounds, "steps_per_round": args.steps, "threads": 1, "model": "mlp-128-512-10",
        "batch": BATCH, "optimizer": "AdamW",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
