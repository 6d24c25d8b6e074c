"""Checkpoint write/read time of mini_trainer.checkpoint against plain safetensors calls.

The state is that of a stack of nn.Linear(2048, 2048) layers (`--params-millions`, default
50, rounded up to whole layers) with AdamW after one step on fake gradients, so exp_avg and
exp_avg_sq exist: about 600 MB of float32. It is a minimal trainer-like state, {"step",
"epoch", "model": model.state_dict(), "optimizer": optimizer.state_dict()}, not a full
`BaseTrainer.state_dict()` (RNG, counters and hooks add a few KB and nothing to measure).
Each side is timed from the live model/optimizer (state_dict() calls included) to files on
disk, and from files on disk back into a model and optimizer built once beforehand:

- ours_save: `save_checkpoint(state, root)`: split_state, model.safetensors and
  optimizer.safetensors written in parallel with sha256 of every byte, manifest.json, an
  fsync of every file and directory, rename into place, `latest`.
- ours_async_stall: what `CheckpointingHook(async_save=True)` makes the training loop wait
  for: state_dict(), the split, and the copy into staging buffers kept from the previous
  save; writing, hashing and fsync then run in a background thread (their time until the
  checkpoint is durable is `ours_async_total_s`, waited for outside the timer).
- raw_save: `safetensors.torch.save_file` of the model tensors into one file and of the
  optimizer tensors (flattened to {"state.0.exp_avg": t, ...}) into another: the same split,
  no hashing, no fsync (what a plain call does).
- ours_load: `load_checkpoint(dir)` (reads and re-hashes every byte), then
  `model.load_state_dict` and `optimizer.load_state_dict`.
- raw_load: `safetensors.torch.load_file` of both files, `model.load_state_dict`, the
  optimizer state dict rebuilt from the flat keys and the param_groups kept in memory, then
  `optimizer.load_state_dict`.

load_file memory-maps lazily and optimizer.load_state_dict keeps the tensors it is given
(no copy when dtype and device match), so on the raw side nothing would read the ~400 MB of
optimizer state until the first optimizer step writes to it (a copy-on-write fault per page
of the private mapping). Both loads therefore end with that first write,
`torch._foreach_mul_(state tensors, 1.0)` ("first use"), timed inside the load and also
reported alone (`*_first_use_s`), with `load_vs_raw_without_first_use` for the ratio
without it. `raw_load_file_only_s` is the two load_file calls alone, for information.

Rounds are interleaved in this one process and the order flips each round (ours first on
even rounds); one untimed warm-up round comes first (it also checks that both sides load
back exactly what was saved). Before each round both sides' previous files are deleted, so
both write fresh files. Times are wall time (`time.perf_counter`), since I/O is the point,
with gc.collect() before each measurement; results are medians over the rounds. Right
after each raw save, outside its timer, the raw files are fsynced one by one: that is
`fsync_s`, what durability costs on this disk, and it also leaves no dirty pages of one side
to be written back during the other side's measurement; `save_vs_raw_fsynced` compares ours
with raw_save + fsync (same durability, the difference is hashing and bookkeeping).

Loads read files that were just written, so they come from the page cache (what a resume
in the same boot on a machine with free memory sees); `--cold` drops the files from the
cache first (posix_fadvise DONTNEED) to read from the disk instead (the pages it frees then
have to be faulted in again by the next writes, which shifts save times too). On a VM that
hands freed memory back to its host (free page reporting), the first touch of memory,
which both sides do a lot of, costs a varying amount, so single rounds vary by up to 2-3x:
look at the medians, and at several runs. Ratios are ours over raw: < 1 means ours is
faster; the goal is <= 1.2 for each. Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mini_trainer.checkpoint import (
    StagingBuffers,
    load_checkpoint,
    prepare_checkpoint,
    read_safetensors,
    save_checkpoint,
    split_state,
    write_checkpoint,
    write_safetensors,
)

WIDTH = 2048
RAW_MODEL = "raw_model.safetensors"
RAW_OPTIMIZER = "raw_optimizer.safetensors"


def make_model(params_millions: float) -> nn.Sequential:
    per_layer = WIDTH * WIDTH + WIDTH
    layers = max(1, math.ceil(params_millions * 1e6 / per_layer))
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers)))


def make_optimizer(model: nn.Module, step: bool) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if step:  # one step on fake gradients: exp_avg, exp_avg_sq and step now exist
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-3
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def flatten_optimizer(optimizer_state: dict) -> dict[str, torch.Tensor]:
    return {
        f"state.{i}.{k}": v
        for i, s in optimizer_state["state"].items()
        for k, v in s.items()
        if isinstance(v, torch.Tensor)
    }


def unflatten_optimizer(flat: dict[str, torch.Tensor], param_groups: list) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def first_use(optimizer: torch.optim.Optimizer) -> None:
    """What the first optimizer step does to the loaded state: write every byte of it."""
    tensors = [v for s in optimizer.state.values() for k, v in s.items() if k != "step" and isinstance(v, torch.Tensor)]
    torch._foreach_mul_(tensors, 1.0)


def drop_from_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_files(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Bench:
    def __init__(self, params_millions: float, directory: Path, cold: bool) -> None:
        self.model = make_model(params_millions)
        self.optimizer = make_optimizer(self.model, step=True)
        self.load_model = make_model(params_millions)  # the targets of both loads, built once
        self.load_optimizer = make_optimizer(self.load_model, step=False)
        self.param_groups = self.optimizer.state_dict()["param_groups"]  # what raw_load keeps in memory
        self.ours_root = directory / "ours"
        self.async_root = directory / "ours_async"
        self.staging = StagingBuffers()  # kept across rounds, as the hook keeps it across saves
        self.writer = concurrent.futures.ThreadPoolExecutor(1)
        self.raw_dir = directory / "raw"
        self.raw_files = [self.raw_dir / RAW_MODEL, self.raw_dir / RAW_OPTIMIZER]
        self.cold = cold
        self.step = 0
        self.ours_dir: Path | None = None

    def clean(self) -> None:
        shutil.rmtree(self.ours_root, ignore_errors=True)
        shutil.rmtree(self.async_root, ignore_errors=True)
        shutil.rmtree(self.raw_dir, ignore_errors=True)
        self.raw_dir.mkdir(parents=True)
        self.load_optimizer.state.clear()  # drop the last load's tensors here, not inside a timer

    # ------------------------------------------------------------------ saves

    def ours_save(self) -> float:
        self.step += 1
        start = time.perf_counter()
        state = {
            "step": self.step,
            "epoch": 0,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        self.ours_dir = save_checkpoint(state, self.ours_root)
        return time.perf_counter() - start

    def ours_async_save(self) -> dict[str, float]:
        start = time.perf_counter()
        state = {
            "step": self.step,
            "epoch": 0,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        staged = self.staging.stage(prepare_checkpoint(state))
        pending = self.writer.submit(write_checkpoint, staged, self.async_root)
        stall = time.perf_counter() - start
        pending.result()
        return {"stall": stall, "total": time.perf_counter() - start}

    def raw_save(self) -> float:
        start = time.perf_counter()
        save_file(self.model.state_dict(), self.raw_files[0])
        save_file(flatten_optimizer(self.optimizer.state_dict()), self.raw_files[1])
        return time.perf_counter() - start

    def raw_fsync(self) -> float:
        start = time.perf_counter()
        fsync_files(self.raw_files)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ loads

    def ours_load(self) -> dict[str, float]:
        assert self.ours_dir is not None
        if self.cold:
            drop_from_cache(sorted(self.ours_dir.iterdir()))
        start = time.perf_counter()
        state = load_checkpoint(self.ours_dir)
        self.load_model.load_state_dict(state["model"])
        self.load_optimizer.load_state_dict(state["optimizer"])
        loaded = time.perf_counter()
        first_use(self.load_optimizer)
        end = time.perf_counter()
        return {"total": end - start, "first_use": end - loaded}

    def raw_load(self) -> dict[str, float]:
        if self.cold:
            drop_from_cache(self.raw_files)
        start = time.perf_counter()
        model_tensors = load_file(self.raw_files[0])
        flat = load_file(self.raw_files[1])
        files_read = time.perf_counter()
        self.load_model.load_state_dict(model_tensors)
        self.load_optimizer.load_state_dict(unflatten_optimizer(flat, self.param_groups))
        loaded = time.perf_counter()
        first_use(self.load_optimizer)
        end = time.perf_counter()
        return {"total": end - start, "first_use": end - loaded, "file_only": files_read - start}

    # ------------------------------------------------------------------ checks

    def check_loaded(self) -> None:
        """The load target now equals the source (model and optimizer state)."""
        for a, b in zip(self.model.parameters(), self.load_model.parameters(), strict=True):
            assert torch.equal(a, b), "loaded model differs from the saved one"
        saved, loaded = self.optimizer.state_dict()["state"], self.load_optimizer.state_dict()["state"]
        assert saved.keys() == loaded.keys(), "loaded optimizer state has other parameters"
        for i in saved:
            for k, v in saved[i].items():
                assert torch.equal(v, loaded[i][k]), f"loaded optimizer state {i}.{k} differs"

    def ours_bytes(self) -> int:
        assert self.ours_dir is not None
        return sum(p.stat().st_size for p in self.ours_dir.iterdir())


def timed(fn):
    gc.collect()
    return fn()


def run_rounds(bench: Bench, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {
        k: []
        for k in (
            "ours_save",
            "ours_async_stall",
            "ours_async_total",
            "raw_save",
            "fsync",
            "ours_load",
            "raw_load",
            "ours_first_use",
            "raw_first_use",
            "raw_file_only",
        )
    }
    for r in range(-1, rounds):  # r == -1: warm-up, not recorded
        bench.clean()
        ours_first = r % 2 == 0
        got: dict[str, float] = {}
        for side in (("ours", "raw") if ours_first else ("raw", "ours")):
            if side == "ours":
                got["ours_save"] = timed(bench.ours_save)
                result = timed(bench.ours_async_save)
                got["ours_async_stall"], got["ours_async_total"] = result["stall"], result["total"]
            else:
                got["raw_save"] = timed(bench.raw_save)
                got["fsync"] = timed(bench.raw_fsync)  # outside raw_save's timer
        for side in (("ours", "raw") if ours_first else ("raw", "ours")):
            if side == "ours":
                result = timed(bench.ours_load)
                got["ours_load"], got["ours_first_use"] = result["total"], result["first_use"]
            else:
                result = timed(bench.raw_load)
                got["raw_load"], got["raw_first_use"], got["raw_file_only"] = (
                    result["total"],
                    result["first_use"],
                    result["file_only"],
                )
            if r == -1:
                bench.check_loaded()
            bench.load_optimizer.state.clear()  # free this load's tensors now, not inside the next timer
        if r >= 0:
            for key, value in got.items():
                times[key].append(value)
    return times


def breakdown(bench: Bench) -> dict[str, float]:
    """Where ours spends its time, once each, outside the rounds (files in bench.raw_dir)."""
    _, by_file = split_state({"model": bench.model.state_dict(), "optimizer": bench.optimizer.state_dict()})
    out: dict[str, float] = {}
    for fsync in (False, True):
        for file, tensors in sorted(by_file.items()):
            path = bench.raw_dir / f"breakdown-{file}"
            path.unlink(missing_ok=True)
            gc.collect()
            start = time.perf_counter()
            write_safetensors(path, tensors, fsync=fsync)
            out[f"write_{file.split('.')[0]}{'_fsync' if fsync else ''}_s"] = time.perf_counter() - start
    for file in sorted(by_file):
        gc.collect()
        start = time.perf_counter()
        read_safetensors(bench.raw_dir / f"breakdown-{file}")
        out[f"read_{file.split('.')[0]}_s"] = time.perf_counter() - start
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--params-millions", type=float, default=50.0, help="model size (rounded up to whole 2048x2048 layers)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a new temporary directory under /tmp)"
    )
    parser.add_argument("--cold", action="store_true", help="drop the files from the page cache before each load")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time write_safetensors/read_safetensors of each file alone"
    )
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="checkpoint_io-", dir=args.dir or "/tmp"))
    try:
        bench = Bench(args.params_millions, directory, args.cold)
        times = run_rounds(bench, args.rounds)
        state_bytes = bench.ours_bytes()
        extra = breakdown(bench) if args.breakdown else {}
        bench.clean()
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}

    def without_first_use(side: str) -> float:
        return statistics.median(t - f for t, f in zip(times[f"{side}_load"], times[f"{side}_first_use"], strict=True))

    params = sum(p.numel() for p in bench.model.parameters())
    result: dict[str, object] = {
        "name": "checkpoint_io",
        "params_millions": round(params / 1e6, 3),
        "state_mb": round(state_bytes / 1e6, 3),
        "save_vs_raw": round(med["ours_save"] / med["raw_save"], 3),
        "save_vs_raw_fsynced": round(
            med["ours_save"] / statistics.median(s + f for s, f in zip(times["raw_save"], times["fsync"], strict=True)),
            3,
        ),
        "async_stall_vs_raw": round(med["ours_async_stall"] / med["raw_save"], 3),
        "load_vs_raw": round(med["ours_load"] / med["raw_load"], 3),
        "load_vs_raw_without_first_use": round(without_first_use("ours") / without_first_use("raw"), 3),
        "ours_save_s": round(med["ours_save"], 3),
        "ours_async_stall_s": round(med["ours_async_stall"], 3),
        "ours_async_total_s": round(med["ours_async_total"], 3),
        "raw_save_s": round(med["raw_save"], 3),
        "ours_load_s": round(med["ours_load"], 3),
        "raw_load_s": round(med["raw_load"], 3),
        "ours_first_use_s": round(med["ours_first_use"], 3),
        "raw_first_use_s": round(med["raw_first_use"], 3),
        "raw_load_file_only_s": round(med["raw_file_only"], 3),
        "fsync_s": round(med["fsync"], 3),
        "rounds": args.rounds,
        "cache": "cold" if args.cold else "hot",
        "goal": "<= 1.2 each",
        **extra,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
