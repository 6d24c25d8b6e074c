"""Batches as nested structures of tensors with the samples on dimension 0: pick samples,
join two batches, check that injected samples are shaped like the batch.

A batch is any nesting of tensors in dicts, lists, tuples and namedtuples (the structures
`mini_trainer.utils.map_nested_tensor` walks); anything else inside it is carried along.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ...utils import map_nested_tensor

__all__ = ["select_samples", "concat_samples", "check_same_structure", "batch_tensors", "batch_size"]


def batch_tensors(batch: Any) -> list[torch.Tensor]:
    """Every tensor of `batch`, in the order `map_nested_tensor` visits them."""
    tensors: list[torch.Tensor] = []
    map_nested_tensor(tensors.append, batch)
    return tensors


def batch_size(batch: Any) -> int:
    """The number of samples: the common size of dimension 0 of every tensor in `batch`."""
    tensors = batch_tensors(batch)
    if not tensors:
        raise TypeError("a batch must hold at least one tensor (samples along the first dimension)")
    sizes = {t.shape[0] if t.ndim else None for t in tensors}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "every tensor of a batch must have the samples on dimension 0 with one size; "
            f"got {sorted(map(str, sizes))}"
        )
    return sizes.pop()


def select_samples(batch: Any, index: torch.Tensor) -> Any:
    """The samples `index` (a device tensor: no host read) of every tensor in `batch`."""
    return map_nested_tensor(lambda t: t.index_select(0, index.to(t.device)), batch)


def concat_samples(first: Any, second: Any) -> Any:
    """`first` and `second` (same structure) joined along the sample dimension; dicts are
    matched by key, not by order, and the result has `first`'s container types."""
    # The check pairs the tensors (it walks both structures anyway); map_nested_tensor
    # then rebuilds `first` visiting its tensors in that same order.
    partners = iter(_matching_tensors(first, second, "batch"))
    return map_nested_tensor(lambda t: torch.cat([t, next(partners).to(t.device)]), first)


def check_same_structure(batch: Any, extra: Any, path: str = "batch") -> None:
    """Raise a ValueError/TypeError naming the first place where `extra` is not shaped like
    `batch` (container types, dict keys, lengths, tensor dtypes and per-sample shapes)."""
    _matching_tensors(batch, extra, path)


def _matching_tensors(batch: Any, extra: Any, path: str) -> list[torch.Tensor]:
    """Check `extra` against `batch` (see check_same_structure) and return `extra`'s tensors
    in the order map_nested_tensor visits their partners in `batch`.

    This walks two structures side by side, which map_nested_tensor (one structure) cannot."""
    if isinstance(batch, torch.Tensor):
        if not isinstance(extra, torch.Tensor):
            raise TypeError(
                f"injected samples: {path} should be a tensor like the batch's; got {type(extra).__name__}"
            )
        if extra.dtype != batch.dtype or extra.shape[1:] != batch.shape[1:]:
            raise ValueError(
                f"injected samples: {path} has dtype {extra.dtype} and per-sample shape {tuple(extra.shape[1:])}; "
                f"the batch has {batch.dtype} and {tuple(batch.shape[1:])}"
            )
        return [extra]
    found: list[torch.Tensor] = []
    if isinstance(batch, Mapping):
        if not isinstance(extra, Mapping) or set(extra) != set(batch):
            got = sorted(map(str, extra)) if isinstance(extra, Mapping) else type(extra).__name__
            raise ValueError(
                f"injected samples: {path} should be a dict with keys {sorted(map(str, batch))}; got {got}"
            )
        for key in batch:
            found += _matching_tensors(batch[key], extra[key], f"{path}[{key!r}]")
    elif isinstance(batch, (list, tuple)):
        if not isinstance(extra, (list, tuple)) or len(extra) != len(batch):
            got = (
                f"{type(extra).__name__} of length {len(extra)}"
                if isinstance(extra, (list, tuple)) else type(extra).__name__
            )
            raise ValueError(
                f"injected samples: {path} should be a {type(batch).__name__} of length {len(batch)}; got {got}"
            )
        for i, (a, b) in enumerate(zip(batch, extra, strict=True)):
            found += _matching_tensors(a, b, f"{path}[{i}]")
    return found
