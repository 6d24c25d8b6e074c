"""A small but complete training run that the reliability tests kill and restart.

It has everything that makes exact resume hard: dropout (RNG), a shuffled StatefulDataLoader
whose epochs do not line up with the accumulation steps, an LR schedule, gradient clipping,
AdamW state and an EMA. Usage:

    python resumable_run.py WORKSPACE [--steps N] [--interval K] [--kill STEP:PHASE]
                            [--kill-after-fsync STEP:N] [--workers N] [--async-save] [--eval]

--kill STEP:PHASE sends SIGKILL to this process during optimizer step STEP (1-based):
PHASE "fwd0"/"fwd1" in the first/second micro-batch's forward, "after" once the step is
done but before it is checkpointed. --kill-after-fsync STEP:N sends SIGKILL right after
the N-th fsync while step STEP's checkpoint is written. Each finished step prints "step N".
--eval adds an EvalHook (every 4 steps, at each epoch's end and at the end) on a held-out
split; each evaluation prints "eval N <val/loss as a float's hex>", and a start "start N".
"""

import argparse
import os
import signal

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mini_trainer import BaseTrainer, CheckpointingHook, EmaHook, EvalHook
from mini_trainer.data import tensor_loader
from mini_trainer.hooks import BaseHook
from mini_trainer.schedules import warmup_cosine

parser = argparse.ArgumentParser()
parser.add_argument("workspace")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--interval", type=int, default=4)
parser.add_argument("--kill", default=None)
parser.add_argument(
    "--kill-after-fsync", default=None, help="STEP:N: SIGKILL right after the N-th fsync of step STEP's checkpoint"
)
parser.add_argument("--workers", type=int, default=0)
parser.add_argument("--load", default="latest")
parser.add_argument("--async-save", action="store_true")
parser.add_argument("--eval", action="store_true")
args = parser.parse_args()

kill_step, kill_phase = (None, None)
if args.kill:
    step, kill_phase = args.kill.split(":")
    kill_step = int(step)


def die_if(step: int, phase: str) -> None:
    if step == kill_step and phase == kill_phase:
        os.kill(os.getpid(), signal.SIGKILL)


current_step = 0  # the last finished step (set before its checkpoint is written)

if args.kill_after_fsync:
    fsync_step, fsync_count = (int(v) for v in args.kill_after_fsync.split(":"))
    real_fsync = os.fsync
    fsyncs = []

    def fsync_then_maybe_die(fd: int) -> None:
        real_fsync(fd)
        if current_step == fsync_step:
            fsyncs.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            if len(fsyncs) == fsync_count:
                print("killed after fsync of", ", ".join(fsyncs), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    os.fsync = fsync_then_maybe_die  # every fsync of a save (the checkpoint package calls os.fsync)


class Resumable(BaseTrainer):
    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))

    def build_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=3e-2, weight_decay=0.01)

    def build_data_loader(self):
        generator = torch.Generator().manual_seed(123)
        x = torch.randn(170, 8, generator=generator)
        y = (x[:, :4].argmax(1) + (x[:, 4] > 1).long()) % 4
        return tensor_loader(x, y, batch_size=16, seed=7, num_workers=args.workers)  # 11 batches per epoch

    def build_lr_scheduler(self):
        return warmup_cosine(self.optimizer, warmup_steps=5, total_steps=args.steps)

    def forward(self, batch):
        die_if(self.step + 1, f"fwd{self.micro}")
        self.micro += 1
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y), {}


class Markers(BaseHook):
    priority = {"on_after_step": 75, "on_after_train": 75, "default": 0}  # after EvalHook, before checkpointing

    def on_before_train(self, trainer):
        if args.eval:
            print(f"start {trainer.step}", flush=True)  # after the checkpoint was restored

    def on_before_step(self, trainer):
        trainer.micro = 0

    def on_after_train(self, trainer):
        self.print_evaluation(trainer)

    def print_evaluation(self, trainer):
        results = trainer.step_info.get("eval")
        if results is not None and results is not getattr(self, "printed", None):
            self.printed = results
            print(f"eval {trainer.step} {float(results['val/loss']).hex()}", flush=True)

    def on_after_step(self, trainer):
        global current_step
        self.print_evaluation(trainer)
        die_if(trainer.step, "after")
        current_step = trainer.step
        print(f"step {trainer.step}", flush=True)


held_out = torch.Generator().manual_seed(99)
trainer = Resumable(
    max_steps=args.steps,
    gradient_accumulation_steps=2,
    grad_clip=1.0,
    seed=0,
    workspace=args.workspace,
    hooks=[
        CheckpointingHook(
            interval=args.interval, keep_previous=2, path="checkpoints", load=args.load, async_save=args.async_save
        ),
        EmaHook(decay=0.9),
        Markers(),
        *([EvalHook(interval=4, every_epoch=True)] if args.eval else []),
    ],
    eval_loaders=DataLoader(TensorDataset(torch.randn(37, 8, generator=held_out), torch.arange(37) % 4), batch_size=8)
    if args.eval else None,
)
trainer.train()
print("done", trainer.step, flush=True)
