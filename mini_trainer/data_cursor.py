"""Where a run stands in its data: the epoch, the batches drawn from it, the iterator.

`DataCursor` owns everything about the position in the data that the trainer used to do
by hand: rolling over into the next epoch (and telling samplers via `set_epoch`), moving
batches to the device, knowing the last batch `max_epochs` allows, and putting the
position back after a resume, onto the same number of processes (the loader's own state,
or skipping the batches already trained on) or onto another number (continuing the
shared `EpochShuffleSampler` permutation after the samples all ranks had consumed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .data import epoch_sampler
from .rng import preserved_rng
from .utils import to_device

__all__ = ["END_OF_DATA", "DataCursor", "cursor_field"]


class _EndOfData:
    def __repr__(self) -> str:
        return "END_OF_DATA"


#: What `DataCursor.next_batch` (and `BaseTrainer.next_batch`) return when `max_epochs`
#: ends in the middle of an optimizer step.
END_OF_DATA = _EndOfData()


def cursor_field(name: str, doc: str) -> property:
    """A property of an owner (the trainer) whose value lives in its `data_cursor`."""
    return property(
        lambda owner: getattr(owner.data_cursor, name),
        lambda owner, value: setattr(owner.data_cursor, name, value),
        doc=doc,
    )


class DataCursor:
    """The position of a run in `loader`, and the batches from there on.

    `epoch` counts passes over a finite loader; `batch_in_epoch` the batches drawn from
    the current pass. Batches come out on `device` (a no-op on the CPU).
    """

    def __init__(self, loader: Iterable | None, device: torch.device, logger: logging.Logger) -> None:
        self.loader = loader
        self.epoch = 0
        self.batch_in_epoch = 0
        self.logger = logger
        self._device = device if device.type != "cpu" else None
        self._iterator: Iterator | None = None
        self._skip_batches = 0  # to fast-forward after a resume (loaders that cannot save their position)
        # The loader state a resume gave the loader, until its next iterator continues that
        # epoch (None: no restored position is waiting; until then it is the loader's state).
        self._pending_loader_state: Any = None
        self._iterated = False  # whether an iterator of `loader` was ever made here

    def replace_loader(self, loader: Iterable) -> None:
        """Train on `loader` from here, starting a new pass over it (the epoch count stays)."""
        self.loader = loader
        self._iterator = None
        self._iterated = False
        self.batch_in_epoch = 0

    def batches_per_epoch(self) -> int | None:
        """The loader's length, or None for loaders without one (streams)."""
        try:
            return len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            return None

    def next_batch(self, max_epochs: int | None) -> Any:
        """The next batch, on the device; finite loaders roll over into the next epoch, and
        at `max_epochs` this returns `END_OF_DATA`."""
        fresh = self._iterator is None
        if fresh:
            self._iterator = self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            # A fresh iterator that is empty at once is a stateful loader restored at the very
            # end of its epoch: count that epoch as done unless it already is (batch_in_epoch
            # is 0 once an epoch is counted).
            if not fresh or self.batch_in_epoch > 0:
                self.roll_over()
                if max_epochs is not None and self.epoch >= max_epochs:
                    return END_OF_DATA
            self._iterator = self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(
                    f"data_loader yielded no batches in epoch {self.epoch}: it is empty or cannot be "
                    "restarted (a generator?); use a re-iterable loader such as a DataLoader"
                ) from None
        self.batch_in_epoch += 1
        return self.to_device(batch)

    def to_device(self, batch: Any) -> Any:
        """`batch` with every tensor in it copied to the device (non-blocking; as is on the CPU)."""
        if self._device is None:
            return batch
        return to_device(batch, self._device)

    def roll_over(self) -> None:
        """Count the current epoch as done; the next batch starts the next one."""
        self.epoch += 1
        self.batch_in_epoch = 0
        self._iterator = None
        self._skip_batches = 0

    def roll_over_if_epoch_done(self) -> None:
        """Close an epoch whose last batch was drawn, when the loader's length says so:
        training for whole epochs then ends without starting a step that finds no data."""
        per_epoch = self.batches_per_epoch()
        if per_epoch and self.batch_in_epoch >= per_epoch:
            self.roll_over()

    def is_last_batch(self, max_epochs: int | None) -> bool:
        """Whether the batch just drawn is the last one `max_epochs` allows (known only for
        loaders with a length)."""
        if max_epochs is None or self.epoch + 1 < max_epochs:
            return False
        per_epoch = self.batches_per_epoch()
        return bool(per_epoch) and self.batch_in_epoch >= per_epoch

    def reached(self, max_epochs: int) -> bool:
        """Whether `max_epochs` epochs are done (an epoch whose last batch was drawn counts)."""
        self.roll_over_if_epoch_done()
        return self.epoch >= max_epochs

    def steps_left(self, max_epochs: int | None, accumulation: int) -> int | None:
        """Optimizer steps until `max_epochs` ends (None: no limit, or a loader without a length)."""
        per_epoch = self.batches_per_epoch()
        if max_epochs is None or not per_epoch:
            return None
        batches_left = (max_epochs - self.epoch) * per_epoch - self.batch_in_epoch
        return math.ceil(max(batches_left, 0) / accumulation)

    def total_steps(self, step: int, max_steps: int | None, max_epochs: int | None, accumulation: int) -> int | None:
        """The step a run at `step` ends at: `max_steps`, or the steps `max_epochs` amount to
        when the loader has a length (the first of the two; None: unknown)."""
        left = self.steps_left(max_epochs, accumulation)
        estimates = [n for n in (max_steps, None if left is None else step + left) if n is not None]
        return min(estimates, default=None)

    def _start_epoch(self) -> Iterator:
        """Tell samplers which epoch this is (so shuffles differ per epoch), then iterate."""
        loader = self.loader
        seen: set[int] = set()
        batch_sampler = getattr(loader, "batch_sampler", None)
        for obj in (
            loader,
            getattr(loader, "sampler", None),
            batch_sampler,
            getattr(batch_sampler, "sampler", None),
            getattr(loader, "dataset", None),
        ):
            if obj is not None and id(obj) not in seen and callable(getattr(obj, "set_epoch", None)):
                seen.add(id(obj))
                obj.set_epoch(self.epoch)
        self._iterated = True
        if self._pending_loader_state is None and not self._skip_batches:
            return iter(loader)  # type: ignore[arg-type]
        # Continuing an epoch after a resume. The uninterrupted run created this epoch's
        # iterator before the checkpoint was taken, and creating one draws from the global
        # RNG (a DataLoader draws its worker seed): draw again now and every later random
        # number (dropout masks, ...) would shift. So the global RNG is put back afterwards.
        with preserved_rng():
            iterator = iter(loader)  # type: ignore[arg-type]
            # A loader that cannot save its position skips the batches already trained on
            # (the same ones only if its order is seeded per epoch; a StatefulDataLoader
            # resumes exactly).
            for _ in range(self._skip_batches):
                next(iterator, None)
        self._pending_loader_state = None
        self._skip_batches = 0
        return iterator

    # ------------------------------------------------------------------ saving and resuming

    def state(self) -> dict[str, Any]:
        """This rank's position that a checkpoint needs (the loader's own state when it
        has `state_dict()`)."""
        save = getattr(self.loader, "state_dict", None)
        if not callable(save):
            return {"data_loader": None}
        # A StatefulDataLoader asked for its state before it has an iterator creates one, and
        # its next `iter()` returns that one: right after a resume that used up the restored
        # position (the epoch started over), and before the first batch it moved the seed
        # draw (and so every random number after it). A restored position not used yet is
        # returned as it is; a loader never iterated has no position to save. (Both found
        # by check_resume: a save right after resuming changed the training that followed.)
        if self._pending_loader_state is not None:
            return {"data_loader": self._pending_loader_state}
        if not self._iterated:
            return {"data_loader": None}
        return {"data_loader": save()}

    def position(self, world: int) -> dict[str, int] | None:
        """Where this epoch stands over all ranks, in samples of the shared permutation
        (only for loaders ordered by an `EpochShuffleSampler` with a fixed batch size)."""
        sampler = epoch_sampler(self.loader)
        batch_size = getattr(self.loader, "batch_size", None)
        if sampler is None or not batch_size:
            return None
        start = sampler.skipped(self.epoch)
        return {"epoch_start": start, "samples": start + self.batch_in_epoch * batch_size * world}

    def restore(self, epoch: int, batch_in_epoch: int, position: Mapping[str, int] | None, loader_state: Any) -> None:
        """Continue where a run on as many processes stopped: the loader's own state when it
        can take it back, otherwise the batches already trained on are skipped."""
        self.epoch, self.batch_in_epoch, self._iterator = epoch, batch_in_epoch, None
        sampler = epoch_sampler(self.loader)
        if sampler is not None and position is not None and position.get("epoch_start"):
            sampler.resume_at(epoch, int(position["epoch_start"]))  # an epoch continued from another world size
        loader_resumes = loader_state is not None and callable(getattr(self.loader, "load_state_dict", None))
        if loader_resumes:
            self.loader.load_state_dict(loader_state)  # type: ignore[union-attr]
        self._skip_batches = 0 if loader_resumes else batch_in_epoch
        if self._skip_batches and type(getattr(self.loader, "sampler", None)) is torch.utils.data.RandomSampler:
            self.logger.warning(
                "resuming mid-epoch with a shuffling DataLoader that cannot save its order: the rest of "
                "epoch %d comes in a different order than before the interruption (use "
                "mini_trainer.data.stateful_loader for an exact resume)", epoch,
            )
        self._pending_loader_state = loader_state if loader_resumes else None

    def move(
        self, epoch: int, batch_in_epoch: int, position: Mapping[str, int] | None, saved_world: int, world: int
    ) -> None:
        """Continue on `world` processes a run saved on `saved_world`: the saved per-rank
        loader states do not apply; the epoch continues after the samples the saved run
        consumed (an `EpochShuffleSampler`), or else by batch count, with a warning."""
        self.epoch, self.batch_in_epoch, self._iterator = epoch, batch_in_epoch, None
        sampler = epoch_sampler(self.loader)
        self._pending_loader_state = None
        if sampler is not None and position is not None:
            sampler.set_epoch(epoch)  # its length below is this epoch's
            sampler.resume_at(epoch, int(position["samples"]))
            self.batch_in_epoch = 0  # counted from the new start of this epoch
            self._skip_batches = 0
            if self.batches_per_epoch() == 0:
                self.roll_over()  # saved at the end of the epoch: nothing of it is left
            return
        self._skip_batches = batch_in_epoch
        if batch_in_epoch:
            self.logger.warning(
                "resuming on %d process(es) a run saved on %d mid-epoch, with a loader that is not ordered by "
                "mini_trainer.data.EpochShuffleSampler: the position in epoch %d is kept as a batch count "
                "(%d batches skipped), so samples may repeat or be missed until the epoch ends",
                world, saved_world, epoch, batch_in_epoch,
            )
