"""SurpriseRepairTrainer's cost: idle (the trigger never fires) against BaseTrainer, and the
price of an injection with extra-only forward against re-forwarding the whole batch.

Model: MLP 64-1024-1024-10 on scikit-learn digits features (batch 256, SGD, one CPU thread:
big enough that the model's compute, not Python, is most of a step).
All runners live in this process and run in interleaved rounds (`--rounds` x `--steps`
steps, order rotating), timed in process CPU time; the figures are medians of per-round
ratios. Printed: one JSON object,
  idle_overhead      steps/s of BaseTrainer / steps/s of SurpriseRepairTrainer whose trigger
                     never fires (goal <= 1.03): per-sample losses, the cv and its host read
  inject_cost_ratio  step time firing every step (k = 20 of 256 from a ReplayBuffer: new
                     samples) with extra-only forward / the same with the whole batch
                     re-forwarded (goal < 1)
  hardest_k_cost_ratio  the same for HardestK, whose samples are the batch's own: reweighted,
                     with no forward at all / re-forwarded

    python benchmarks/surprise_repair.py [--rounds 9] [--steps 40]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseTrainer
from mini_trainer.datasets import load_digits_tensors
from mini_trainer.strategies import HardestK, LossStdConfig, LossStdTrigger, ReplayBuffer, SurpriseRepairTrainer


def make(kind: str, batches: list) -> BaseTrainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    common = dict(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        data_loader=batches,
        device="cpu",
        max_non_finite_grad_retries=0,
    )
    if kind == "base":
        return BaseTrainer(forward_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), **common)
    never = LossStdConfig(std_threshold=-1.0, pulse_every=10**9)
    always = LossStdConfig(std_threshold=1e9, budget_frac=1.0, inject_ratio=0.08)
    config = never if kind == "idle" else always
    provider = HardestK() if kind.startswith("hardest") else ReplayBuffer(capacity=256, keep_per_batch=32)
    return SurpriseRepairTrainer(criterion=nn.CrossEntropyLoss(), trigger=LossStdTrigger(provider, config),
                                 reforward_all=kind.endswith("reforward"), **common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = load_digits_tensors()["train"].tensors
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, 256 * 5, 256)]
    kinds = ["base", "idle", "inject", "reforward", "hardest", "hardest_reforward"]
    trainers = {k: make(k, batches) for k in kinds}
    for trainer in trainers.values():
        trainer.fit(steps=5)  # warm-up
    gc.collect()
    gc.freeze()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
        for kind in order:
            start = time.process_time()
            trainers[kind].fit(steps=args.steps)
            times[kind].append((time.process_time() - start) / args.steps)
    idle = statistics.median(i / b for i, b in zip(times["idle"], times["base"], strict=True))
    inject = statistics.median(i / f for i, f in zip(times["inject"], times["reforward"], strict=True))
    hardest = statistics.median(i / f for i, f in zip(times["hardest"], times["hardest_reforward"], strict=True))
    print(json.dumps({
        "idle_overhead": round(idle, 4),
        "inject_cost_ratio": round(inject, 4),
        "hardest_k_cost_ratio": round(hardest, 4),
        "base_step_ms": round(1e3 * statistics.median(times["base"]), 3),
        "idle_step_ms": round(1e3 * statistics.median(times["idle"]), 3),
        "inject_step_ms": round(1e3 * statistics.median(times["inject"]), 3),
        "reforward_step_ms": round(1e3 * statistics.median(times["reforward"]), 3),
        "hardest_step_ms": round(1e3 * statistics.median(times["hardest"]), 3),
        "rounds": args.rounds,
        "steps": args.steps,
    }))


if __name__ == "__main__":
    main()
