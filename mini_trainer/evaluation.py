"""Evaluation: the mechanics behind `BaseTrainer.evaluate()`.

Every metric is a mean over samples: each batch's records are weighted by its number of
samples (`count_samples`, or a `samples` record from `eval_forward`), summed, and divided
by the number of samples once at the end. In a distributed run each rank evaluates every
`world`-th batch of the same loader (batch b goes to rank b % world), so no sample is
padded in or counted twice however the split divides, and the sums of all ranks travel
in one all-reduce per evaluation. Under FSDP2 a forward needs every rank (its all-gathers):
ranks then agree batch by batch whether anyone still has one, and a rank that ran out
repeats a batch whose results it throws away.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, SequentialSampler

from . import distributed, utils
from .metrics import count_samples, to_host_floats
from .rng import preserved_rng
from .utils import eval_mode, flatten_dict

__all__ = ["check_eval_loaders", "evaluate", "evaluate_loaders", "rank_batches", "scoring"]

#: The split name a single eval loader gets.
DEFAULT_SPLIT = "val"


def check_eval_loaders(value: Any, name: str) -> dict[str, Iterable] | None:
    """`{split: loader}` from what `name` gave: None, one re-iterable loader (the split
    "val"), or a dict of them; otherwise a TypeError/ValueError naming `name`."""
    if value is None:
        return None
    loaders = dict(value) if isinstance(value, Mapping) else {DEFAULT_SPLIT: value}
    for split, loader in loaders.items():
        where = f"{name}[{split!r}]" if isinstance(value, Mapping) else name
        if not isinstance(split, str) or not split or "/" in split:
            raise ValueError(f"{name}: split names must be non-empty strings without '/'; got {split!r}")
        if isinstance(loader, (str, bytes)) or not isinstance(loader, Iterable):
            raise TypeError(
                f"{where} must be an iterable of batches (a DataLoader, a list) or a dict of them; "
                f"got {type(loader).__name__}"
            )
        if isinstance(loader, Iterator):  # not iter(loader): a DataLoader's iterator draws from the global RNG
            raise TypeError(
                f"{where} is an iterator ({type(loader).__name__}): it would be empty at the second "
                "evaluation; pass something iterable again, such as a DataLoader or a list of batches"
            )
        if isinstance(getattr(loader, "sampler", None), DistributedSampler):
            raise ValueError(
                f"{where} uses a {type(loader.sampler).__name__}, which pads a split that does not divide "
                "evenly with repeated samples; give every rank the plain loader: evaluate() hands each rank "
                "its own batches"
            )
    return loaders


def evaluate(trainer: Any, loaders: Any, model: nn.Module | None) -> dict[str, float]:
    """`BaseTrainer.evaluate`, on the trainer's public surface."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"evaluate(model) must be an nn.Module (e.g. EmaHook.ema_model) or None; "
                        f"got {type(model).__name__}")
    trainer.build()
    loaders = trainer.eval_loaders if loaders is None else check_eval_loaders(loaders, "evaluate(loaders)")
    lockstep = trainer.parallel == "fsdp" and model is None  # FSDP2: a forward needs every rank
    to_device = trainer.data_cursor.to_device
    if model is not None:  # batches go where its weights are (an EmaHook(device="cpu") copy)
        device = next(itertools.chain(model.parameters(), model.buffers()), torch.empty(0)).device
        to_device = functools.partial(utils.to_device, device=device)
    with scoring(trainer, model), trainer.autocast():
        return evaluate_loaders(loaders, trainer.eval_forward, to_device=to_device, lockstep=lockstep,
                                owner=type(trainer).__name__)


@contextlib.contextmanager
def scoring(trainer: Any, model: nn.Module | None) -> Iterator[None]:
    """The state `BaseTrainer.evaluate` scores in: `trainer.model` is `model` (default: the
    trained model, without its DDP wrapper), in eval mode, under no_grad; every module's
    mode, the trained model and the global RNG are given back afterwards (also on error):
    evaluating never changes the training that follows (a DataLoader's iterator draws a
    seed from the global RNG, so it would otherwise shift every later dropout mask)."""
    trained = trainer.model
    scored = model if model is not None else distributed.module_for_evaluation(trained)
    trainer.model = scored
    try:
        with torch.no_grad(), eval_mode(scored), preserved_rng():
            yield
    finally:
        trainer.model = trained


class _EveryNth:
    """Every `world`-th item of a batch sampler, from `rank` on (a sampler of index lists)."""

    def __init__(self, batch_sampler: Iterable, rank: int, world: int) -> None:
        self.batch_sampler, self.rank, self.world = batch_sampler, rank, world

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.batch_sampler), self.rank, None, self.world)

    def __len__(self) -> int:
        return len(range(self.rank, len(self.batch_sampler), self.world))  # type: ignore[arg-type]


def rank_batches(loader: Iterable, rank: int, world: int) -> Iterator:
    """This rank's batches of `loader`: batch b when b % world == rank. A map-style
    DataLoader only loads those (a copy of it with a strided batch sampler; a shuffling one
    is read in order instead, since each rank would shuffle differently and a mean does not
    depend on the order); any other iterable is read through, skipping the other ranks'
    batches, and must yield the same batches in the same order on every rank."""
    if world == 1:
        return iter(loader)
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None and not isinstance(
        loader.dataset, IterableDataset
    ):
        batches = loader.batch_sampler
        if loader.batch_size is not None and not isinstance(loader.sampler, SequentialSampler):
            batches = BatchSampler(SequentialSampler(loader.dataset), loader.batch_size, loader.drop_last)
        options = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                       timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                       multiprocessing_context=loader.multiprocessing_context)
        if loader.num_workers > 0:
            options.update(prefetch_factor=loader.prefetch_factor, persistent_workers=False)
        return iter(DataLoader(loader.dataset, batch_sampler=_EveryNth(batches, rank, world), **options))
    return itertools.islice(iter(loader), rank, None, world)


class _SplitSums:
    """Sample-weighted sums of one split's records, on the device until the end."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, Any] = {}  # floats, or 0-d tensors for counts that eval_forward gave as tensors

    def add(self, records: Any, batch: Any) -> None:
        if not isinstance(records, Mapping):
            raise TypeError(f"{self.owner}.eval_forward must return a dict of numbers; got {type(records).__name__}")
        records = flatten_dict(records)
        weight = records.pop("samples", None)
        weight = count_samples(batch) if weight is None else weight
        if isinstance(weight, torch.Tensor) and weight.numel() == 1 and not weight.is_complex():
            weight = weight.detach().reshape(()).to(torch.float64)  # a count on the device: read at the end
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(
                f"{self.owner}.eval_forward: cannot weight this batch by its size (got {weight!r}): batches need a "
                "tensor whose first dimension is the batch size, or eval_forward must return a 'samples' count > 0"
            )
        for name, value in records.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1 or value.is_complex():
                    raise TypeError(f"{self.owner}.eval_forward returned record {name!r} as a tensor of shape "
                                    f"{tuple(value.shape)}; records must be numbers or single-element tensors")
                value = value.detach().reshape(()).to(torch.float64) * weight
            elif isinstance(value, (int, float)):  # bool is an int
                value = weight * float(value)
            else:
                raise TypeError(f"{self.owner}.eval_forward returned record {name!r} of type {type(value).__name__} "
                                f"({value!r}); records must be numbers or single-element tensors")
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts[name] + weight if name in self.counts else weight


def evaluate_loaders(
    loaders: Mapping[str, Iterable],
    eval_forward: Callable[[Any], Any],
    *,
    to_device: Callable[[Any], Any],
    lockstep: bool,
    owner: str,
) -> dict[str, float]:
    """`{"<split>/<metric>": sample-weighted mean}` over every split in `loaders` (the
    caller sets no_grad, eval mode, autocast). `lockstep`: every rank runs the same number
    of forwards (FSDP2)."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    per_split: list[_SplitSums] = []
    for loader in loaders.values():
        sums = _SplitSums(owner)
        batches = rank_batches(loader, rank, world)
        if lockstep and world > 1:
            _lockstep(batches, loader, sums, eval_forward, to_device)
        else:
            for batch in batches:
                batch = to_device(batch)
                sums.add(eval_forward(batch), batch)
        per_split.append(sums)
    found = {f"{split}/{name}": (sums.sums[name], sums.counts[name])
             for split, sums in zip(loaders, per_split, strict=True) for name in sums.sums}
    keys = distributed.union_of_names(list(found))  # a split may have had no batch on this rank
    values = [found.get(key, (0.0, 0.0)) for key in keys]
    # One stack of the device sums, one all-reduce of everything, one transfer to the host.
    totals = to_host_floats([v[0] for v in values] + [v[1] for v in values], sync=True)
    n = len(keys)
    return {key: totals[i] / totals[n + i] if totals[n + i] > 0 else math.nan for i, key in enumerate(keys)}


def _lockstep(
    batches: Iterator, loader: Iterable, sums: _SplitSums, eval_forward: Callable, to_device: Callable
) -> None:
    """Forward this rank's batches while any rank still has one; a rank that ran out runs a
    batch again (its last, or the loader's first) and discards the result."""
    filler = None
    while True:
        batch = next(batches, None)
        if not distributed.agree_max(int(batch is not None)):
            return
        if batch is None:
            if filler is None:
                filler = to_device(next(iter(loader)))
            eval_forward(filler)
            continue
        batch = filler = to_device(batch)
        sums.add(eval_forward(batch), batch)
