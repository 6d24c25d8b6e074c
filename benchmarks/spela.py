"""SPELA (`mini_trainer.strategies.spela.SpelaTrainer`) against backprop: accuracy, step time
and the memory a training step needs.

1. Accuracy on scikit-learn digits (`digits_loaders(batch_size=32, seed=S)`: 1437 training
   images, 360 test images, 44 steps an epoch). SPELA trains
   `nn.Sequential(Linear(64, 512), ReLU, Linear(512, 256), ReLU, Linear(256, 34))` with
   `SpelaTrainer(model, num_classes=10, lr=5e-2, seed=S, device="cpu")` (SGD, momentum 0.9:
   the trainer's default), `trainer.fit(loaders["train"], epochs=E)`, then
   `trainer.evaluate(loaders["test"])["accuracy"]` (the last layer's; `spela_exit_acc` lists
   every exit layer's). The output layer is deliberately wider than the 10 classes, like the
   paper's 784-1000-34. Backprop trains the same hidden layers with a 10-way output
   (64-512-256-10, ReLU) with cross-entropy and Adam(lr=1e-3) through `BaseTrainer`, for the
   same epochs over a loader built the same way (same split, same batch order), and is scored
   by the argmax of its logits on the same test split. Each model is initialised after
   `torch.manual_seed(S)`; results are the mean over seeds S = 0..seeds-1 (per-seed values in
   `*_per_seed`). Learning rates were picked once on this machine with 30 epochs and 3 seeds
   (2026-11-22): SPELA lr 5e-2 -> 97.4% mean (lr 1e-2 -> 96.8%; with the class vectors of
   commit 89fc4b5, the same simplex in another random orientation, 97.8% and 97.1%: the
   orientation alone moves SPELA by ~0.4 points); backprop Adam 1e-3 -> 97.8% (5e-4 ->
   97.8% too, each seed within one test image of 1e-3, so PyTorch's default 1e-3 is kept).
   Nothing else was tuned. Since 2026-12-03 SPELA centres its hidden layers' inputs
   (`center_layer_inputs=True`, the default): 97.5% mean with lr 5e-2 (exits 95.9 / 97.2 / 97.5).
   The same blocks as CNNs: benchmarks/spela_cnn.py.

2. Step time of a deep MLP, 64 -> 8 hidden layers of 2048 (ReLU) -> 10, 29.4M parameters,
   float32, batch 64 of random data (16 fixed batches, cycled), SGD(lr=1e-2, momentum=0.9) on
   both sides, so the optimizer state is the same. SPELA uses the very same nn.Sequential
   (its last layer is 10 wide, not 34, so both sides hold exactly the same parameters and
   momentum buffers). Three runners:
   - "spela": `SpelaTrainer(model, num_classes=10, lr=1e-2, data_loader=batches)` with its
     defaults (so one gradient-norm reduction and finite check per layer), timed through
     `trainer.fit(steps=n)`: each layer's forward, local cosine loss, backward, SGD step and
     `zero_grad(set_to_none=True)` before the next layer runs.
   - "backprop": a hand-written loop, forward + cross-entropy + backward + SGD step +
     `zero_grad(set_to_none=True)`.
   - "spela_plain": SPELA's math written by hand on the same `SpelaNet` helpers, one SGD per
     layer, no norm, no finite check, no trainer bookkeeping: the floor of what SPELA costs
     (`spela_plain_step_time_ratio`), to tell the algorithm's cost from the trainer's.
   All three live in this one process and run in interleaved rounds (`--rounds` of `--steps`
   steps each, the order rotating every round) after 3 warm-up steps each, with
   `gc.freeze()` as in overhead.py. On the CPU with one thread (`--threads`, default 1) the
   clock is this process's CPU time (`time.process_time`), so other processes' load does not
   count; with more threads, wall time. `step_time_ratio` is the median over rounds of
   spela's time / backprop's time in that round; `*_step_ms` are median times per step.
   Before the runners are built, glibc is told to keep freed memory (`mallopt`: mmap
   threshold 32 MiB, its maximum, and no heap trimming), so a step reuses what the previous
   one freed and nobody pays page faults (`*_page_faults_per_step`, minor faults, should read
   0). With the defaults, whether backprop's 112 MiB of gradients are handed back to the
   system and faulted in again every step depends on the heap's history: in one
   six-runner experiment it did (~25k faults, +60-70 ms a step on this VM, which would have
   made the ratio look ~20% better for SPELA); `--default-malloc` times with the defaults.
   `--threads 2` is only meaningful on an otherwise idle machine: with another process on
   one of two cores, OpenMP threads wait on each other and SPELA's many small per-layer
   operations suffer most (one such run: ratio 2.4).

3. Peak memory of a step, same deep MLP and data, CPU: each method runs in its OWN fresh
   process (this script re-invoked with `--memory-worker`), because peak RSS only goes up.
   There: build a throwaway SGD (the first optimizer imports torch._dynamo and sympy, ~70
   MiB) and take the RSS (`runtime_mib`), build the model and optimizer, run 2 warm-up steps
   (so the momentum buffers exist), `gc.collect()`, take the current RSS (/proc/self/statm)
   as the baseline, reset the kernel's peak-RSS mark to it (`echo 5 > /proc/self/clear_refs`;
   if that is refused, the peak is the process's lifetime peak, warm-up steps included), run
   `--memory-steps` steps, and read the peak as VmHWM from /proc/self/status. (Not
   `getrusage(RUSAGE_SELF).ru_maxrss`: for a process started by fork + exec, Linux folds the
   parent's peak at the fork into it, so the worker reported this 1.1 GiB parent's RSS,
   whatever the method.) A step's extra memory is peak - baseline: `peak_memory_ratio` =
   SPELA's extra / backprop's extra. `peak_total_ratio` is the ratio of the peaks themselves
   (everything resident: the interpreter and torch, ~0.3 GiB, weights and momentum, 2 x 112
   MiB, and the step's extra), so readers see both; `peak_over_runtime_ratio` leaves out the
   interpreter and torch (peak - `runtime_mib`: weights + momentum + the step's extra).
   With `set_to_none=True`, backprop holds all 9 layers' gradients (112 MiB) at once at the
   end of its backward; SPELA frees each layer's gradient (16 MiB for a 2048x2048 layer)
   before the next layer runs.
   glibc's malloc raises its mmap threshold to the size of each mmapped block it frees (up to
   32 MiB): after the first free, 16 MiB gradients come from the heap and stay resident once
   freed, so the after-warm-up baseline would already contain them and SPELA's extra would
   read ~0. The worker therefore fixes the threshold first (`mallopt(M_MMAP_THRESHOLD,
   128 KiB)`, which also turns the adjustment off): every tensor of 128 KiB or more is its
   own mapping, returned to the system when freed, and RSS follows the live tensors.
   `--no-mallopt` measures with the default malloc instead (`mmap_threshold_fixed` says which).

   If `torch.cuda.is_available()`, parts 2 and 3 are also run on the GPU, in this process:
   `cuda_step_time_ratio` (wall time, `torch.cuda.synchronize()` before and after each timed
   stretch) and `cuda_peak_memory_ratio` from `torch.cuda.max_memory_allocated()` after
   `reset_peak_memory_stats()` minus `memory_allocated()` after the warm-up, one method at a
   time with nothing else alive on the GPU (`cuda_peak_total_ratio`: the peaks themselves).
   Without CUDA they are null.

`goals` states whether the issue's targets are met: SPELA's accuracy no more than 3 points
below backprop's, `peak_memory_ratio <= 0.5`, `step_time_ratio <= 0.8`. The default run
(3 seeds x 30 epochs, 7 rounds x 5 steps, 5 memory steps) takes about 1.5 minutes on a
2-core CPU machine. Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseTrainer
from mini_trainer.datasets import digits_loaders
from mini_trainer.strategies.spela import SpelaConfig, SpelaNet, SpelaTrainer

# torchdata's StatefulDataLoader calls a deprecated torch API on every iterator.
warnings.filterwarnings("ignore", message=".*set_vital.*")

IN_FEATURES = 64
HIDDEN = 2048
DEPTH = 8  # hidden layers
CLASSES = 10
DEEP_BATCH = 64
DEEP_LR = 1e-2
MOMENTUM = 0.9
MMAP_THRESHOLD = 128 * 1024
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MIB = 2**20

# ============================================================================ 1. accuracy


def digits_mlp(out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, out))


def cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def test_accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = count = 0
    for x, y in loader:
        correct += (model(x).argmax(dim=1) == y).sum().item()
        count += y.numel()
    return correct / count


def accuracy_one_seed(seed: int, epochs: int, batch_size: int, spela_lr: float, backprop_lr: float) -> dict[str, Any]:
    loaders = digits_loaders(batch_size=batch_size, seed=seed)
    torch.manual_seed(seed)
    spela = SpelaTrainer(digits_mlp(34), num_classes=10, lr=spela_lr, seed=seed, device="cpu")
    start = time.perf_counter()
    spela.fit(loaders["train"], epochs=epochs)
    spela_s = time.perf_counter() - start
    spela_steps = spela.step
    spela_result = spela.evaluate(loaders["test"])

    loaders = digits_loaders(batch_size=batch_size, seed=seed)  # a fresh loader: same split, same order
    torch.manual_seed(seed)
    model = digits_mlp(10)
    backprop = BaseTrainer(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=backprop_lr),
        data_loader=loaders["train"],
        forward_fn=cross_entropy,
        seed=seed,
        device="cpu",
    )
    start = time.perf_counter()
    backprop.fit(epochs=epochs)
    backprop_s = time.perf_counter() - start
    assert backprop.step == spela_steps, (backprop.step, spela_steps)
    exits = [v for k, v in sorted(spela_result.items()) if k.startswith("exit_")]
    return {
        "spela": spela_result["accuracy"],
        "spela_exits": exits,
        "backprop": test_accuracy(model, loaders["test"]),
        "steps": spela_steps,
        "spela_s": spela_s,
        "backprop_s": backprop_s,
    }


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    runs = [accuracy_one_seed(s, args.epochs, args.batch_size, args.spela_lr, args.backprop_lr)
            for s in range(args.seeds)]
    spela = [r["spela"] for r in runs]
    backprop = [r["backprop"] for r in runs]
    exits = [statistics.mean(e) for e in zip(*(r["spela_exits"] for r in runs), strict=True)]
    return {
        "spela_acc": round(statistics.mean(spela), 4),
        "backprop_acc": round(statistics.mean(backprop), 4),
        "acc_gap_points": round(100 * (statistics.mean(spela) - statistics.mean(backprop)), 2),
        "spela_acc_per_seed": [round(a, 4) for a in spela],
        "backprop_acc_per_seed": [round(a, 4) for a in backprop],
        "spela_exit_acc": [round(a, 4) for a in exits],
        "digits_steps": runs[0]["steps"],
        "digits_spela_train_s": round(statistics.mean(r["spela_s"] for r in runs), 2),
        "digits_backprop_train_s": round(statistics.mean(r["backprop_s"] for r in runs), 2),
    }


# ============================================================================ 2, 3: deep MLP


def deep_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(HIDDEN, HIDDEN), nn.ReLU()]
    layers.append(nn.Linear(HIDDEN, CLASSES))
    return nn.Sequential(*layers)


def random_batches(device: torch.device, count: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(DEEP_BATCH, IN_FEATURES, generator=g).to(device),
         torch.randint(0, CLASSES, (DEEP_BATCH,), generator=g).to(device))
        for _ in range(count)
    ]


class Cycle:
    def __init__(self, batches: list) -> None:
        self.batches, self.i = batches, 0

    def next(self):
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch


class SpelaRun:
    """SpelaTrainer as shipped, defaults kept."""

    def __init__(self, device: torch.device) -> None:
        self.trainer = SpelaTrainer(deep_mlp(), num_classes=CLASSES, lr=DEEP_LR, momentum=MOMENTUM,
                                    data_loader=random_batches(device), device=device)

    def run(self, steps: int) -> None:
        self.trainer.fit(steps=steps)


class SpelaPlainRun:
    """SPELA's step by hand on the same SpelaNet helpers: one SGD per layer, nothing else."""

    def __init__(self, device: torch.device) -> None:
        self.net = SpelaNet.from_sequential(deep_mlp(), SpelaConfig(num_classes=CLASSES)).to(device)
        self.optimizers = [torch.optim.SGD(layer.parameters(), lr=DEEP_LR, momentum=MOMENTUM)
                           for layer in self.net.layers]
        self.data = Cycle(random_batches(device))

    def run(self, steps: int) -> None:
        net = self.net
        for _ in range(steps):
            x, y = self.data.next()
            h = x
            for k, optimizer in enumerate(self.optimizers):
                out = net.layer_output(net.layer_input(h, k), k)
                target = net.vectors(k, out.shape[1], out.device)[y]
                (-F.cosine_similarity(out, target, dim=1).mean()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                h = out.detach()


class BackpropRun:
    def __init__(self, device: torch.device) -> None:
        self.model = deep_mlp().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=DEEP_LR, momentum=MOMENTUM)
        self.data = Cycle(random_batches(device))

    def run(self, steps: int) -> None:
        model, optimizer = self.model, self.optimizer
        for _ in range(steps):
            x, y = self.data.next()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


RUNNERS = {"spela": SpelaRun, "spela_plain": SpelaPlainRun, "backprop": BackpropRun}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(device: torch.device, rounds: int, steps: int, cpu_clock: bool) -> dict[str, Any]:
    runs = {name: cls(device) for name, cls in RUNNERS.items()}
    for run in runs.values():
        run.run(3)  # warm-up: optimizer state, allocator, first-call costs
    sync(device)
    clock = time.process_time if cpu_clock else time.perf_counter
    gc.collect()
    gc.freeze()
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    faults = dict.fromkeys(names, 0)
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                sync(device)
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = clock()
                runs[name].run(steps)
                sync(device)
                times[name].append((clock() - start) / steps)
                faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        gc.unfreeze()
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))  # noqa: E731
    return {
        "step_time_ratio": round(ratio("spela", "backprop"), 3),
        "spela_plain_step_time_ratio": round(ratio("spela_plain", "backprop"), 3),
        "spela_vs_spela_plain": round(ratio("spela", "spela_plain"), 3),
        **{f"{name}_step_ms": round(1e3 * statistics.median(t), 2) for name, t in times.items()},
        **{f"{name}_page_faults_per_step": round(f / (rounds * steps)) for name, f in faults.items()},
        "step_time_ratio_range": [
            round(min(x / y for x, y in zip(times["spela"], times["backprop"], strict=True)), 3),
            round(max(x / y for x, y in zip(times["spela"], times["backprop"], strict=True)), 3),
        ],
    }


# ---------------------------------------------------------------------------- CPU memory


def mallopt(**settings: int) -> bool:
    """glibc's mallopt for each setting (False when not glibc or a value is refused)."""
    try:
        function = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_int]
    numbers = {"mmap_threshold": M_MMAP_THRESHOLD, "trim_threshold": M_TRIM_THRESHOLD}
    return all(function(numbers[name], value) == 1 for name, value in settings.items())


def fix_mmap_threshold() -> bool:
    """Every allocation of 128 KiB or more gets its own mapping, unmapped when freed."""
    return mallopt(mmap_threshold=MMAP_THRESHOLD)


def keep_freed_memory() -> bool:
    """Allocations up to 32 MiB (glibc's maximum threshold) come from the heap, and the heap
    is never trimmed: memory freed by one step is reused by the next without page faults."""
    return mallopt(mmap_threshold=32 * MIB, trim_threshold=2**30)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This address space's peak RSS (VmHWM). Not `ru_maxrss`: for a process started by
    fork + exec, Linux folds the parent's peak at the fork into it, so a child of this (big)
    benchmark process would report the parent's RSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_worker(method: str, steps: int, mallopt: bool) -> None:
    """Runs in its own process: prints {"baseline": bytes, "peak": bytes, ...}."""
    fixed = fix_mmap_threshold() if mallopt else False
    # The first optimizer built imports torch._dynamo and sympy (~70 MiB): do it before `start`.
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    gc.collect()
    start = current_rss()  # interpreter + torch, no model yet
    run = RUNNERS[method](torch.device("cpu"))
    run.run(2)  # warm-up: momentum buffers now exist
    gc.collect()
    baseline = current_rss()
    reset = reset_peak_rss()
    run.run(steps)
    print(json.dumps({"start": start, "baseline": baseline, "peak": peak_rss(), "peak_reset": reset,
                      "mmap_threshold_fixed": fixed}))


def cpu_memory(args: argparse.Namespace) -> dict[str, Any]:
    got = {}
    for method in ("spela", "backprop"):
        command = [sys.executable, os.path.abspath(__file__), "--memory-worker", method,
                   "--memory-steps", str(args.memory_steps), "--threads", str(args.threads)]
        if args.no_mallopt:
            command.append("--no-mallopt")
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        got[method] = json.loads(out.strip().splitlines()[-1])
    extra = {m: got[m]["peak"] - got[m]["baseline"] for m in got}
    over_runtime = {m: got[m]["peak"] - got[m]["start"] for m in got}
    return {
        "peak_memory_ratio": round(extra["spela"] / extra["backprop"], 3),
        "peak_total_ratio": round(got["spela"]["peak"] / got["backprop"]["peak"], 3),
        "peak_over_runtime_ratio": round(over_runtime["spela"] / over_runtime["backprop"], 3),
        "spela_extra_mib": round(extra["spela"] / MIB, 1),
        "backprop_extra_mib": round(extra["backprop"] / MIB, 1),
        "spela_peak_mib": round(got["spela"]["peak"] / MIB, 1),
        "backprop_peak_mib": round(got["backprop"]["peak"] / MIB, 1),
        "spela_baseline_mib": round(got["spela"]["baseline"] / MIB, 1),
        "backprop_baseline_mib": round(got["backprop"]["baseline"] / MIB, 1),
        "runtime_mib": round(got["backprop"]["start"] / MIB, 1),
        "peak_rss_reset_after_warmup": got["spela"]["peak_reset"] and got["backprop"]["peak_reset"],
        "mmap_threshold_fixed": got["spela"]["mmap_threshold_fixed"] and got["backprop"]["mmap_threshold_fixed"],
    }


# ---------------------------------------------------------------------------- CUDA


def cuda_memory(device: torch.device, steps: int) -> dict[str, Any]:
    got = {}
    for method in ("spela", "backprop"):
        gc.collect()
        torch.cuda.empty_cache()
        run = RUNNERS[method](device)
        run.run(2)
        sync(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run.run(steps)
        sync(device)
        got[method] = {"baseline": baseline, "peak": torch.cuda.max_memory_allocated(device)}
        del run
    gc.collect()
    torch.cuda.empty_cache()
    extra = {m: got[m]["peak"] - got[m]["baseline"] for m in got}
    return {
        "cuda_peak_memory_ratio": round(extra["spela"] / extra["backprop"], 3),
        "cuda_peak_total_ratio": round(got["spela"]["peak"] / got["backprop"]["peak"], 3),
        "cuda_spela_extra_mib": round(extra["spela"] / MIB, 1),
        "cuda_backprop_extra_mib": round(extra["backprop"] / MIB, 1),
        "cuda_spela_peak_mib": round(got["spela"]["peak"] / MIB, 1),
        "cuda_backprop_peak_mib": round(got["backprop"]["peak"] / MIB, 1),
    }


def cuda_part(args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"cuda_step_time_ratio": None, "cuda_peak_memory_ratio": None}
    device = torch.device("cuda")
    result = cuda_memory(device, args.memory_steps)
    times = step_times(device, args.rounds, args.steps * 4, cpu_clock=False)  # steps are short on a GPU
    result.update({f"cuda_{k}": v for k, v in times.items()})
    result["cuda_device"] = torch.cuda.get_device_name(device)
    return result


# ============================================================================ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="digits runs to average (seeds 0..n-1)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32, help="digits batch size")
    parser.add_argument("--spela-lr", type=float, default=5e-2)
    parser.add_argument("--backprop-lr", type=float, default=1e-3, help="Adam's, for the digits backprop baseline")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every part")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=5, help="steps per runner per timing round")
    parser.add_argument("--memory-steps", type=int, default=5, help="steps measured in each memory process")
    parser.add_argument("--no-mallopt", action="store_true",
                        help="measure CPU memory with glibc's default mmap threshold")
    parser.add_argument("--default-malloc", action="store_true",
                        help="time CPU steps with glibc's default heap settings")
    parser.add_argument("--skip-accuracy", action="store_true", help="leave out part 1 (goals then say null for it)")
    parser.add_argument("--skip-timing", action="store_true",
                        help="leave out the CPU step times (goals then say null for it)")
    parser.add_argument("--memory-worker", choices=list(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_worker:
        memory_worker(args.memory_worker, args.memory_steps, mallopt=not args.no_mallopt)
        return

    result: dict[str, Any] = {"name": "spela"}
    if not args.skip_accuracy:
        result.update(accuracy(args))
    if not args.skip_timing:
        result["timing_keeps_freed_memory"] = False if args.default_malloc else keep_freed_memory()
        result.update(step_times(torch.device("cpu"), args.rounds, args.steps, cpu_clock=args.threads == 1))
    result.update(cpu_memory(args))
    result.update(cuda_part(args))
    acc_ok = None if args.skip_accuracy else result["spela_acc"] >= result["backprop_acc"] - 0.03
    result["goals"] = {
        "accuracy_within_3_points": acc_ok,
        "peak_memory_ratio<=0.5": result["peak_memory_ratio"] <= 0.5,
        "step_time_ratio<=0.8": None if args.skip_timing else result["step_time_ratio"] <= 0.8,
    }
    if result["cuda_step_time_ratio"] is not None:
        result["goals"]["cuda_peak_memory_ratio<=0.5"] = result["cuda_peak_memory_ratio"] <= 0.5
        result["goals"]["cuda_step_time_ratio<=0.8"] = result["cuda_step_time_ratio"] <= 0.8
    result.update(
        seeds=args.seeds,
        epochs=args.epochs,
        digits_batch=args.batch_size,
        spela_lr=args.spela_lr,
        backprop_optimizer=f"Adam(lr={args.backprop_lr})",
        deep_model=f"mlp-{IN_FEATURES}-{DEPTH}x{HIDDEN}-{CLASSES}",
        deep_batch=DEEP_BATCH,
        deep_optimizer=f"SGD(lr={DEEP_LR}, momentum={MOMENTUM})",
        threads=args.threads,
        clock="process_time" if args.threads == 1 else "perf_counter",
        rounds=args.rounds,
        steps_per_round=args.steps,
        memory_steps=args.memory_steps,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
