"""Bookkeeping overhead of BaseTrainer against a hand-written PyTorch loop.

Both train the same MLP (64-256-256-10, AdamW, batch 64) on the same batches, on the CPU
with one thread, in interleaved rounds inside this one process (so the machine's noise
hits both alike). Two pairings, each doing the same math on both sides:

- "trainer_vs_plain": BaseTrainer with ProgressHook + LoggingHook (interval 100), gradient
  clipping and the default non-finite check, against a loop that also clips.
- "bare_trainer_vs_plain": BaseTrainer without hooks, clipping or finite check, against a
  loop without clipping.
- "bare_events_vs_plain": the same bare trainer consumed as a stream of step events
  (`for event in trainer.events(steps=...)`), against the same loop: what the event stream
  adds per step (one generator resume and one dict).

Times are this process's CPU time (`time.process_time`), so a busy neighbour on the
machine does not count against either side. Data comes either from pre-built batches in
memory ("memory": the strictest view, nothing to hide the trainer's cost behind) or from a
shuffling DataLoader ("dataloader": what a real loop looks like). Ratios are steps/s of the
trainer over steps/s of the loop (median of the rounds); >= 0.97 is the goal.
"plain_vs_plain" runs the loop against itself the same way: its distance from 1.0 is the
noise floor of this machine. Prints one JSON object on its last line.
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
from torch.utils.data import DataLoader, TensorDataset

from mini_trainer import BaseTrainer, LoggingHook, ProgressHook


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))


def make_data(kind: str, steps: int) -> tuple[object, int]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64 * 64, 64, generator=g)
    y = torch.randint(0, 10, (64 * 64,), generator=g)
    if kind == "memory":
        return [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(x), 64)], 64
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=g, drop_last=True)
    return loader, len(loader)


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


class PlainLoop:
    """What a careful user writes by hand."""

    def __init__(self, data, clip: bool) -> None:
        self.model = make_model()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.data, self.clip = data, clip
        self.iterator = iter(data)

    def run(self, steps: int) -> None:
        model, optimizer = self.model, self.optimizer
        for _ in range(steps):
            try:
                x, y = next(self.iterator)
            except StopIteration:
                self.iterator = iter(self.data)
                x, y = next(self.iterator)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


class TrainerRun:
    def __init__(self, data, bare: bool) -> None:
        model = make_model()
        hooks = [] if bare else [ProgressHook(interval=100, file=io.StringIO()), LoggingHook(interval=100)]
        self.trainer = BaseTrainer(
            model=model,
            optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
            data_loader=data,
            forward_fn=cross_entropy,
            hooks=hooks,
            grad_clip=None if bare else 1.0,
            max_non_finite_grad_retries=None if bare else 0,
            device="cpu",
            max_steps=0,
        )

    def run(self, steps: int) -> None:
        self.trainer.max_steps += steps
        self.trainer.train()


class EventsRun(TrainerRun):
    def run(self, steps: int) -> None:
        for _ in self.trainer.events(steps=steps):
            pass


def measure(data_kind: str, bare: bool | None, rounds: int, steps: int, events: bool = False) -> dict[str, float]:
    """bare=None pits the plain loop against a second copy of itself: the noise floor."""
    data, _ = make_data(data_kind, steps)
    if bare is None:
        plain, trainer = PlainLoop(data, clip=True), PlainLoop(data, clip=True)
    elif events:
        plain, trainer = PlainLoop(data, clip=not bare), EventsRun(data, bare)
    else:
        plain, trainer = PlainLoop(data, clip=not bare), TrainerRun(data, bare)
    plain.run(20), trainer.run(20)  # warm-up: allocator, first-call costs
    # Python's full garbage collections walk every object torch created at import (about
    # 90 ms here) and land on whichever side happens to trigger them: freeze what exists
    # now so they stop dominating the noise. Both sides still pay their own collections.
    gc.collect()
    gc.freeze()
    ratios, plain_times, trainer_times = [], [], []
    for r in range(rounds):
        order = (plain, trainer) if r % 2 == 0 else (trainer, plain)
        times = {}
        for runner in order:
            start = time.process_time()  # CPU time: other processes' load does not count
            runner.run(steps)
            times[runner] = time.process_time() - start
        plain_times.append(times[plain])
        trainer_times.append(times[trainer])
        ratios.append(times[plain] / times[trainer])
    return {
        "ratio": statistics.median(ratios),
        "plain_steps_per_s": steps / statistics.median(plain_times),
        "trainer_steps_per_s": steps / statistics.median(trainer_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict[str, object] = {"name": "overhead"}
    noise = measure("memory", bare=None, rounds=args.rounds, steps=args.steps)
    result["plain_vs_plain"] = round(noise["ratio"], 4)  # A/A control: how far 1.0 drifts by chance
    for data_kind in ("memory", "dataloader"):
        full = measure(data_kind, bare=False, rounds=args.rounds, steps=args.steps)
        bare = measure(data_kind, bare=True, rounds=args.rounds, steps=args.steps)
        suffix = "" if data_kind == "memory" else "_dataloader"
        result[f"trainer_vs_plain{suffix}"] = round(full["ratio"], 4)
        result[f"bare_trainer_vs_plain{suffix}"] = round(bare["ratio"], 4)
        result[f"plain_steps_per_s{suffix}"] = round(full["plain_steps_per_s"], 1)
        result[f"trainer_steps_per_s{suffix}"] = round(full["trainer_steps_per_s"], 1)
    result["bare_events_vs_plain"] = round(
        measure("memory", bare=True, rounds=args.rounds, steps=args.steps, events=True)["ratio"], 4
    )
    result.update(rounds=args.rounds, steps_per_round=args.steps, threads=1, model="mlp-64-256-256-10", batch=64)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
