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
from torch.utils.data import Dataset, Sampler, TensorDataset

from .builder import REGISTRY
from .utils import check_int

__all__ = ["EpochShuffleSampler", "split_train_loader", "stateful_loader", "tensor_loader"]


class EpochShuffleSampler(Sampler[int]):
    """Indices `0..len(data_source)-1`, shuffled by `torch.randperm` seeded with `seed + epoch`
    (in order when `shuffle=False`). Call `set_epoch(epoch)` before iterating; the trainer
    does it for you."""

    def __init__(self, data_source: Sized, *, shuffle: bool = True, seed: int = 0) -> None:
        check_int("seed", seed)
        self.data_source = data_source
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        n = len(self.data_source)
        if not self.shuffle:
            return iter(range(n))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(n, generator=generator).tolist())


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
    **kwargs: Any,
) -> Any:
    """A `torchdata.stateful_dataloader.StatefulDataLoader` over `dataset` whose position and
    future epoch order survive a checkpoint. Its workers ignore SIGTERM/SIGINT, so that a
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
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(dataset, shuffle=shuffle, seed=seed),
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
