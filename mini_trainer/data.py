"""Data loaders that resume exactly.

A checkpoint must bring back not only where in the epoch a run stopped, but also the order
of every epoch after it. `stateful_loader` builds a torchdata `StatefulDataLoader` (its
`state_dict()` records the position, and the trainer saves it) over an `EpochShuffleSampler`,
whose order is a pure function of `(seed, epoch)`: the trainer calls `set_epoch` before each
epoch, so after a resume the loader recomputes the same permutation and skips what was
already yielded. (A `StatefulDataLoader(shuffle=True, generator=g)` restores the position,
but in our tests the epochs after the resumed one came out in a different order: the
generator's state is not carried across epochs the same way.)
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, TensorDataset

from .builder import REGISTRY
from .distributed import rank_and_world
from .utils import check_int

__all__ = ["EpochShuffleSampler", "epoch_sampler", "split_train_loader", "stateful_loader", "tensor_loader"]


class EpochShuffleSampler(DistributedSampler):
    """Indices of `data_source` for this rank, shuffled by `torch.randperm` seeded with
    `seed + epoch` (in order when `shuffle=False`). Call `set_epoch(epoch)` before
    iterating; the trainer does it for you.

    With `num_replicas` processes it is a `DistributedSampler` and yields exactly what
    one would: the epoch's permutation padded (or, with `drop_last`, cut) to a multiple of
    `num_replicas`, and every `num_replicas`-th index from `rank` on. So batch b of every
    rank together is batch b of a single process with `num_replicas` times the batch size,
    and a run resumes onto a different number of processes by skipping, in the shared
    permutation, the samples already trained on (`resume_at`).
    """

    def __init__(
        self,
        data_source: Sized,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        check_int("seed", seed)
        check_int("num_replicas", num_replicas, minimum=1)
        check_int("rank", rank, minimum=0)
        if rank >= num_replicas:
            raise ValueError(f"rank must be in 0..num_replicas-1 = 0..{num_replicas - 1}; got {rank}")
        super().__init__(
            data_source, num_replicas=num_replicas, rank=rank, shuffle=bool(shuffle), seed=seed, drop_last=drop_last
        )
        self.data_source = data_source
        self.start = 0  # samples of the permutation skipped in epoch `start_epoch` (a resume)
        self.start_epoch: int | None = None

    def resume_at(self, epoch: int, samples: int) -> None:
        """Start epoch `epoch` after its first `samples` indices (over all ranks), e.g. to
        continue on 1 process an epoch that 2 processes had half done."""
        check_int("epoch", epoch, minimum=0)
        check_int("samples", samples, minimum=0)
        self.start_epoch, self.start = epoch, samples

    def skipped(self, epoch: int | None = None) -> int:
        """Samples skipped at the start of `epoch` (default: the current one; see `resume_at`)."""
        return self.start if self.start_epoch == (self.epoch if epoch is None else epoch) else 0

    def _sizes(self) -> tuple[int, int]:
        """(samples per rank, samples over all ranks) of the current epoch."""
        n = max(len(self.data_source) - self.skipped(), 0)
        if self.drop_last:
            per_rank = n // self.num_replicas
        else:
            per_rank = -(-n // self.num_replicas)
        return per_rank, per_rank * self.num_replicas

    def __len__(self) -> int:
        return self._sizes()[0]

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=generator).tolist()
        else:
            indices = list(range(n))
        indices = indices[self.skipped() :]
        _, total = self._sizes()
        if len(indices) < total:  # pad by repeating from the start, as DistributedSampler does
            indices += (indices * -(-total // max(len(indices), 1)))[: total - len(indices)]
        indices = indices[:total]
        if self.num_replicas == 1:
            return iter(indices)
        return iter(indices[self.rank : total : self.num_replicas])


@REGISTRY.register()
def stateful_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
    **kwargs: Any,
) -> Any:
    """A `torchdata.stateful_dataloader.StatefulDataLoader` over `dataset` whose position and
    future epoch order survive a checkpoint. In a distributed run (torchrun), each rank
    reads its own share of every epoch (an `EpochShuffleSampler`, i.e. a
    `DistributedSampler`; `num_replicas`/`rank` default to the process group's or
    torchrun's), and `batch_size` is per rank. Its workers ignore SIGTERM/SIGINT, so that a
    signal sent to the whole process group reaches the trainer's checkpointing instead of
    killing them. Extra keywords go to `StatefulDataLoader` (e.g. `persistent_workers`,
    `prefetch_factor`, `worker_init_fn`)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    check_int("batch_size", batch_size, minimum=1)
    check_int("num_workers", num_workers, minimum=0)
    if not isinstance(dataset, Sized):
        raise TypeError(
            f"stateful_loader needs a map-style dataset with a length; got {type(dataset).__name__} "
            "(for an iterable dataset, build a StatefulDataLoader yourself and give the dataset state_dict())"
        )
    worker_init_fn = kwargs.pop("worker_init_fn", None)
    for forbidden in ("sampler", "batch_sampler", "generator"):
        if forbidden in kwargs:
            raise TypeError(f"stateful_loader chooses the sampler itself; remove {forbidden}= (use shuffle= and seed=)")
    env_rank, env_world = rank_and_world()
    num_replicas = env_world if num_replicas is None else num_replicas
    rank = (env_rank if num_replicas == env_world else 0) if rank is None else rank
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(dataset, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank),
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        worker_init_fn=_WorkerInit(worker_init_fn) if num_workers else worker_init_fn,
        **kwargs,
    )


def tensor_loader(*tensors: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0, **kwargs: Any) -> Any:
    """`stateful_loader` over `TensorDataset(*tensors)`: batches are tuples of tensors."""
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError("tensor_loader needs one or more tensors with the same first dimension")
    return stateful_loader(TensorDataset(*tensors), batch_size, shuffle=shuffle, seed=seed, **kwargs)


def epoch_sampler(loader: Any) -> EpochShuffleSampler | None:
    """The `EpochShuffleSampler` that orders `loader`'s epochs, if it has one."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for candidate in (getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        if isinstance(candidate, EpochShuffleSampler):
            return candidate
    return None


def split_train_loader(loaders: Any, name: str) -> tuple[Any, dict[str, Any]]:
    """`(train loader, {split: loader})` from either one loader or a dict such as
    `digits_loaders()` returns (`{"train": ..., "test": ...}`); `name` is the argument the
    value came from, for the error."""
    if not isinstance(loaders, Mapping):
        return loaders, {}
    if "train" not in loaders:
        raise KeyError(f"{name} gave a dict without a 'train' loader (keys: {', '.join(map(str, loaders))})")
    return loaders["train"], {k: v for k, v in loaders.items() if k != "train"}


class _WorkerInit:
    """Loader workers ignore SIGTERM and SIGINT from anyone but their own process. A
    preemption (SLURM, `kill -TERM -<pgid>`) signals the whole process group; a worker
    dying of it would crash the main process on its next batch before `CheckpointingHook`
    could finish the step, save and exit. The workers still end with the main process, and
    SIGTERM from the main process itself (how multiprocessing stops its workers at exit)
    still ends the worker at once, which is why the sender is checked (Linux: `sigwaitinfo`
    reports it; where that is missing, workers keep the default behaviour). A class, not a
    closure: workers started with "spawn" must be able to pickle it."""

    def __init__(self, user_fn: Callable[[int], None] | None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask"):
            # Take SIGTERM out of normal delivery (threads started later inherit the mask)
            # and decide per sender in a thread of our own.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            threading.Thread(target=_terminate_only_for, args=(os.getppid(),), daemon=True).start()
        if self.user_fn is not None:
            self.user_fn(worker_id)


def _terminate_only_for(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:  # the loader (or multiprocessing at exit) stopping this worker
            os._exit(128 + signal.SIGTERM)  # what the default action would report
