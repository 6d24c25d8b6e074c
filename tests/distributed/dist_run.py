"""One training run that the distributed tests start under torchrun (or plain python).

A small MLP on fixed synthetic data, loaded with `mini_trainer.data.tensor_loader` (each rank
reads its share). Options switch on what a test needs: the parallelism, per-rank batch
size, accumulation, clipping, checkpoints (full or sharded), a NaN loss / a stop request / a
signal / a SIGKILL on one rank only (or a death at a chosen point in each torchrun attempt),
counting gradient collectives per micro-step, sync'd metrics. Rank 0 writes `result.json`
and the final full model to `final.safetensors` in the workspace; every rank writes
`rank<N>.json`.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mini_trainer import (
    BaseTrainer,
    CheckpointingHook,
    EarlyStoppingHook,
    EmaHook,
    EvalHook,
    LoggingHook,
    ProgressHook,
    distributed,
)
from mini_trainer.data import tensor_loader
from mini_trainer.hooks import BaseHook

parser = argparse.ArgumentParser()
parser.add_argument("workspace")
parser.add_argument("--parallelism", default="auto", choices=["auto", "ddp", "fsdp", "none"])
parser.add_argument("--batch", type=int, default=4, help="per-rank batch size")
parser.add_argument("--accum", type=int, default=1)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--epochs", type=int, default=None, help="train for this many epochs instead of --steps")
parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
parser.add_argument("--clip", type=float, default=None)
parser.add_argument("--dropout", type=float, default=0.0)
parser.add_argument("--interval", type=int, default=None, help="checkpoint every N steps")
parser.add_argument("--sharded", action="store_true")
parser.add_argument("--load", default="latest")
parser.add_argument("--ema", action="store_true")
parser.add_argument("--metrics", action="store_true", help="LoggingHook + ProgressHook with sync=True")
parser.add_argument("--count-comm", action="store_true")
parser.add_argument("--nan", default=None, help="RANK:STEP: that rank's loss is NaN on the first try of STEP")
parser.add_argument("--stop", default=None, help="RANK:STEP: that rank alone asks to stop after STEP")
parser.add_argument("--sigterm", default=None, help="RANK:STEP: that rank alone gets SIGTERM during STEP")
parser.add_argument("--sigkill", default=None, help="RANK:STEP: that rank SIGKILLs itself after STEP")
parser.add_argument(
    "--kill-at",
    default=None,
    help="ATTEMPT:RANK:STEP:WHERE,...: on torchrun attempt ATTEMPT (TORCHELASTIC_RESTART_COUNT) that rank SIGKILLs "
    "itself during STEP: in forward, writing the checkpoint (the rank that writes), or 1 s into the first all-reduce "
    "of the step (the other rank is blocked in it); or 'raise': an exception in forward",
)
parser.add_argument("--retries", type=int, default=2)
parser.add_argument("--fail-write", type=int, default=None, help="RANK: writing a checkpoint fails there (disk full)")
parser.add_argument("--events", type=int, default=None, help="no step limit: consume trainer.events() through take(N)")
parser.add_argument("--device", default="cpu", help="cpu, or cuda: this rank's GPU (LOCAL_RANK) with NCCL")
parser.add_argument("--eval", type=int, default=None, help="EvalHook(interval=N) on held-out splits (23, 7 samples)")
parser.add_argument("--early-stop", default=None, help="PATIENCE:MIN_DELTA of an EarlyStoppingHook on val/loss")
parser.add_argument("--keep-best", action="store_true", help="CheckpointingHook(keep_best='val/loss')")
args = parser.parse_args()


def rank_step(option):
    if option is None:
        return None, None
    rank, step = option.split(":")
    return int(rank), int(step)


RANK = int(os.environ.get("RANK", "0"))
ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
KILL_AT = {}  # where -> step, for this rank in this torchrun attempt
for item in filter(None, (args.kill_at or "").split(",")):
    attempt, rank, step, where = item.split(":")
    if attempt == ATTEMPT and int(rank) == RANK:
        KILL_AT[where] = int(step)
TAKING = {"step": 0}  # the step being taken


def die_here(where):
    if KILL_AT.get(where) != TAKING["step"]:
        return
    if where == "allreduce":
        time.sleep(1.0)  # the other rank is blocked in this all-reduce by now
    print(f"KILL rank {RANK} attempt {ATTEMPT} step {TAKING['step']} at {where}", flush=True)
    if where == "raise":
        raise RuntimeError(f"simulated failure on rank {RANK}")
    os.kill(os.getpid(), signal.SIGKILL)


torch.set_num_threads(1)
g = torch.Generator().manual_seed(1234)
X = torch.randn(96, 8, generator=g)
W = torch.randn(8, 4, generator=g)
Y = (X @ W).tanh() + 0.05 * torch.randn(96, 4, generator=g)
# Held-out splits whose sizes divide neither by 2 ranks nor by their batch sizes: a
# DataLoader of 23 samples in batches of 5 (5 batches), and a plain list of 7 single samples.
VAL_X, TEST_X = torch.randn(23, 8, generator=g), torch.randn(7, 8, generator=g)
VAL_Y, TEST_Y = (VAL_X @ W).tanh(), (TEST_X @ W).tanh()
EVAL_LOADERS = {"val": DataLoader(TensorDataset(VAL_X, VAL_Y), batch_size=5),
                "test": [(TEST_X[i : i + 1], TEST_Y[i : i + 1]) for i in range(7)]}


class Run(BaseTrainer):
    def build_model(self):
        torch.manual_seed(0)  # the same initial weights everywhere (FSDP2 needs that)
        model = nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Dropout(args.dropout), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
        )
        torch.manual_seed(100 + RANK)  # different dropout masks per rank: resume must restore each rank's own RNG
        return model

    def build_optimizer(self):
        if args.optimizer == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=0.2, momentum=0.9)
        return torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.01)

    def build_data_loader(self):
        return tensor_loader(X, Y, batch_size=args.batch, seed=7)

    def build_lr_scheduler(self):
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0 / (1 + 0.1 * s))

    def forward(self, batch):
        die_here("forward")
        die_here("raise")
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        nan_rank, nan_step = rank_step(args.nan)
        if RANK == nan_rank and self.step + 1 == nan_step and self.step_info["retries"] == 0:
            loss = loss * float("nan")
        return loss, {"rank": torch.tensor(float(RANK))}

    def backward(self, loss):
        if not args.count_comm:
            return super().backward(loss)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            super().backward(loss)
        names = ("c10d::allreduce_", "c10d::_reduce_scatter_base_", "c10d::reduce_scatter_")
        counts.append(sum(1 for e in prof.events() if e.name in names))


class Faults(BaseHook):
    """Per-rank faults, and a record of what every step saw."""

    def on_before_step(self, trainer):
        TAKING["step"] = trainer.step + 1
        rank, step = rank_step(args.sigterm)
        if RANK == rank and trainer.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_after_step(self, trainer):
        seen.append(
            {"step": trainer.step, "retries": trainer.step_info["retries"], "loss": float(trainer.step_info["loss"])}
        )
        rank, step = rank_step(args.stop)
        if RANK == rank and trainer.step == step:
            trainer.should_stop = True
        rank, step = rank_step(args.sigkill)
        if RANK == rank and trainer.step == step:
            os.kill(os.getpid(), signal.SIGKILL)


if args.parallelism == "none" and "WORLD_SIZE" in os.environ:
    # parallelism=None: the user owns the process group and the model is not wrapped, so
    # ranks train apart but must still agree on retries and stopping.
    torch.distributed.init_process_group("gloo")

if args.fail_write == RANK:
    from mini_trainer import checkpoint

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device (simulated)")

    checkpoint.write_checkpoint = disk_full

if KILL_AT:
    from mini_trainer.checkpoint import writing  # the module that writes the manifest

    write_file, agree_max = writing.write_file, distributed.agree_max

    def write_file_or_die(path, *rest, **options):  # the checkpoint's tensors are written, its manifest not
        if Path(path).name == "manifest.json":
            die_here("write")
        return write_file(path, *rest, **options)

    def agree_max_or_die(value):
        die_here("allreduce")
        return agree_max(value)

    writing.write_file, distributed.agree_max = write_file_or_die, agree_max_or_die

counts: list[int] = []
seen: list[dict] = []
hooks = [Faults()]
if args.interval is not None or args.sharded or args.sigterm or args.sigkill or args.keep_best:
    hooks.append(
        CheckpointingHook(
            interval=args.interval,
            path="ckpt",
            load=None if args.load == "none" else args.load,
            sharded=args.sharded,
            exit_wait=20,
            keep_best="val/loss" if args.keep_best else None,
        )
    )
if args.eval:
    hooks.append(EvalHook(interval=args.eval))
if args.early_stop is not None:
    patience, min_delta = args.early_stop.split(":")
    hooks.append(EarlyStoppingHook(monitor="val/loss", patience=int(patience), min_delta=float(min_delta)))
if args.ema:
    hooks.append(EmaHook(decay=0.9))
if args.metrics:
    hooks += [LoggingHook(interval=2, sync=True), ProgressHook(interval=2, sync=True)]

trainer = Run(
    max_steps=None if args.epochs or args.events else args.steps,
    max_epochs=args.epochs,
    gradient_accumulation_steps=args.accum,
    grad_clip=args.clip,
    max_non_finite_grad_retries=args.retries,
    parallelism=None if args.parallelism == "none" else args.parallelism,
    workspace=args.workspace,
    device="auto" if args.device == "cuda" else args.device,
    seed=0,
    hooks=hooks,
    eval_loaders=EVAL_LOADERS,
)
if args.events:
    from mini_trainer.stream import collect, take

    events = collect(take(args.events)(trainer.events()))
    assert [e["step"] for e in events] == list(range(1, args.events + 1))
else:
    trainer.train()

workspace = Path(args.workspace)
state = trainer.state_dict()
(workspace / f"rank{RANK}.json").write_text(json.dumps({
    "world": distributed.get_world_size(),
    "backend": torch.distributed.get_backend() if distributed.is_distributed() else None,
    "device": str(trainer.device),
    "parallel": trainer.parallel,
    "sampler": type(trainer.data_loader.sampler).__name__,
    "step": trainer.step,
    "epoch": trainer.epoch,
    "comm_per_micro_step": counts,
    "seen": seen,
    "evaluations": [[step, results] for hook in trainer.hooks if isinstance(hook, EvalHook)
                    for step, results in hook.history],
    "evaluate": trainer.evaluate(),  # every rank takes part
}))
if distributed.is_main_process():
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in state["model"].items()}
    for hook in trainer.hooks:
        if isinstance(hook, EmaHook):
            tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in hook.ema_model.state_dict().items()})
    save_file(tensors, str(workspace / "final.safetensors"))
sys.exit(0)
