"""Sources: where events come from. `epoch_stream` trains on in-memory tensors and yields
one event per epoch; `iter_batches` is the batching it uses. (The other source is
`BaseTrainer.events()`: one event per step of a full-featured run.)"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .checks import check, detail
from .events import Event


def iter_batches(
    *tensors: torch.Tensor,
    batch_size: int = 1,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield aligned batches (tuples, one slice per tensor) along the first dimension.

    The last batch is smaller when the sample count is not a multiple of `batch_size`.
    With `shuffle`, one `torch.randperm` per call orders the samples; pass a seeded
    `generator` for a reproducible order (the permutation is drawn on the generator's
    device and moved to the data's).

    >>> x = torch.arange(10).reshape(5, 2)
    >>> y = torch.arange(5)
    >>> [tuple(b.tolist() for b in batch) for batch in iter_batches(x, y, batch_size=2, shuffle=False)][-1]
    ([[8, 9]], [4])
    """
    # A generator, as in fitstream: nothing is checked before the first next(). A bad
    # batch_size fails there as torch's `split` reports it.
    if not tensors:
        return
    n = _sample_count(tensors, "tensors", shuffle)
    yield from _batches(tensors, n, batch_size, shuffle, generator)


def _batches(tensors, n, batch_size, shuffle, generator) -> Iterator[tuple[torch.Tensor, ...]]:
    if not tensors:
        return
    if not shuffle:
        # Same sample count (checked above): same chunks. Not strict, as fitstream, for
        # what is not a tensor.
        yield from zip(*(t.split(batch_size) for t in tensors), strict=False)
        return
    device = generator.device if isinstance(generator, torch.Generator) else tensors[0].device
    if n is None:
        n = tensors[0].shape[0]
    order = torch.randperm(n, device=device, generator=generator).to(tensors[0].device)
    for chunk in order.split(batch_size):
        yield tuple(t[chunk] for t in tensors)


def epoch_stream(
    train_data: Sequence[torch.Tensor],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., torch.Tensor],
    *,
    batch_size: int = 1,
    shuffle: bool = True,
    last_label: bool = True,
    generator: torch.Generator | None = None,
    extra: dict[str, Any] | None = None,
    step_offset: int = 0,
) -> Iterator[Event]:
    """Train on in-memory tensors, one event per epoch, forever (cut it with `take`,
    `early_stop` or `itertools.islice`).

    Args:
        train_data: tensors with the samples along the first dimension. With
            `last_label=True` the last one holds the labels and the others are the model's
            inputs (`model(*inputs)`); otherwise all are inputs.
        model, optimizer: the model to train and an optimizer over its parameters.
        loss_fn: `loss_fn(predictions, labels)`, or `loss_fn(predictions)` without labels;
            it must average over the batch (the epoch loss weights batches by their size).
        batch_size, shuffle, generator: how batches are drawn (see `iter_batches`).
        extra: keys added to every event.
        step_offset: added to the 1-based epoch number in `step` (to continue a count).

    Each event holds `model`, `step` (epoch number), `train_loss` (the epoch's mean loss,
    a float: read once per epoch) and `train_time_sec`. Model and data must already be on
    the same device; the model is put in training mode at the start of every epoch.

    >>> x = torch.tensor([[1.0], [2.0]]); y = torch.tensor([[2.0], [4.0]])
    >>> model = nn.Linear(1, 1, bias=False)
    >>> _ = nn.init.zeros_(model.weight)
    >>> stream = epoch_stream((x, y), model, torch.optim.SGD(model.parameters(), lr=0.0), nn.MSELoss(), batch_size=2)
    >>> event = next(stream)
    >>> event["step"], event["train_loss"]
    (1, 10.0)
    """
    # A generator, as in fitstream: the arguments are checked on the first next(), in
    # fitstream's order, with fitstream's exception types and messages (plus ours).
    check("batch_size", batch_size, "an int >= 1", lambda v: v <= 0, "batch_size must be a positive integer.")
    if not train_data:
        raise ValueError("train_data must contain at least one tensor." + detail("train_data", train_data, TENSORS))
    if last_label and len(train_data) < 2:
        raise ValueError(
            "last_label=True requires at least two tensors (inputs and labels)."
            f" Got {len(train_data)} tensor; pass last_label=False for a loss without labels."
        )
    if not isinstance(step_offset, int):
        raise TypeError("step_offset must be an integer." + detail("step_offset", step_offset, "an int"))
    extra = extra or {}
    if not isinstance(extra, Mapping):
        raise TypeError(
            f"Event() argument after ** must be a mapping, not {type(extra).__name__}."
            + detail("extra", extra, "a dict of keys to add to each event")
        )
    _sample_count(train_data, "train_data", shuffle)
    batching = (batch_size, shuffle, generator)
    yield from _epochs(train_data, model, optimizer, loss_fn, batching, last_label, extra, step_offset)


def _epochs(train_data, model, optimizer, loss_fn, batching, last_label, extra, step_offset) -> Iterator[Event]:
    batch_size, shuffle, generator = batching
    epoch = step_offset
    while True:
        model.train()
        started = time.perf_counter()
        # The epoch loss is summed on the device and read once at the end: no host sync
        # per batch.
        loss_sum = torch.zeros((), device=train_data[0].device)
        samples = 0
        for batch in iter_batches(*train_data, batch_size=batch_size, shuffle=shuffle, generator=generator):
            inputs, labels = (batch[:-1], batch[-1]) if last_label else (batch, None)
            predictions = model(*inputs)
            loss = loss_fn(predictions, labels) if last_label else loss_fn(predictions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            size = inputs[0].shape[0]
            loss_sum += loss.detach() * size
            samples += size
        epoch += 1
        yield Event(
            model=model,
            step=epoch,
            train_loss=(loss_sum / samples).item(),
            train_time_sec=time.perf_counter() - started,
            **extra,
        )


TENSORS = "a sequence of tensors with the samples along the first dimension"


def _sample_count(tensors: Sequence[torch.Tensor], name: str, shuffle: bool = False) -> int | None:
    """The tensors' common sample count. Tensors of different lengths raise ValueError
    (fitstream cuts them to the shortest or drops samples, silently), or IndexError where
    fitstream raises that (shuffled, a tensor shorter than the first: an index out of
    bounds). Anything that is not a tensor of at least one dimension is left to fail as it
    fails in fitstream."""
    if not all(isinstance(t, torch.Tensor) and t.ndim for t in tensors):
        return None  # fitstream's AttributeError or IndexError, where it raises them
    counts = {t.shape[0] for t in tensors}
    if len(counts) != 1:
        shapes = [tuple(t.shape) for t in tensors]
        error = IndexError if shuffle and min(counts) < tensors[0].shape[0] else ValueError
        raise error(f"{name} must share their first (sample) dimension; got shapes {shapes}")
    return tensors[0].shape[0]
