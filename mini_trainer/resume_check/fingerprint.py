"""Fingerprints: what check_resume compares between two runs, without keeping either.

`state_fingerprints(state)` turns a trainer's `state_dict()` into `{dotted path: digest}`,
one entry per tensor, number or string in it, so that two runs are compared bit for bit
(a tensor's digest hashes its dtype, shape and raw bytes) and the first entry that differs
can be named. `batch_fingerprint(batch)` does the same for one batch, as one digest.

`trainer_attributes(trainer)` is the inspection of a user's subclass and hooks: every
attribute that holds tensors, modules, random generators, numbers, strings or containers
of them, fingerprinted, so that an attribute which changed during training but came back
from a resume with another value can be named. Objects of other types are not looked into:
their insides are not the user's training state as far as anyone can tell from outside.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import random
import sys
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

#: Tensors larger than this (elements) are fingerprinted only where a resume is checked,
#: not at every step of the uninterrupted run (where small attributes are, to tell
#: nondeterministic ones such as timings apart).
LARGE_TENSOR = 1 << 24
_MAX_ITEMS = 100_000  # a container longer than this is not inspected (a dataset, not a counter)
_MAX_DEPTH = 8


def tensor_digest(tensor: torch.Tensor) -> str:
    """A digest of `tensor`'s dtype, shape and bytes (equal digests: equal bit for bit)."""
    tensor = tensor.detach()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    if tensor.is_quantized:
        tensor = tensor.int_repr()
    digest = hashlib.blake2b(f"{tensor.dtype}{tuple(tensor.shape)}".encode(), digest_size=12)
    data = tensor.cpu().contiguous().reshape(-1)
    if data.numel():
        digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.hexdigest()


def _scalar_text(value: Any) -> str:
    """Numbers exactly (float.hex), the rest by repr."""
    if isinstance(value, float):
        return f"float:{value.hex()}" if math.isfinite(value) else f"float:{value!r}"
    return f"{type(value).__name__}:{value!r}"


def _numpy() -> Any:
    return sys.modules.get("numpy")


def state_fingerprints(state: Any, prefix: str = "") -> dict[str, str]:
    """`{dotted path: digest}` for every leaf of a nested training state."""
    out: dict[str, str] = {}

    def visit(value: Any, path: str) -> None:
        numpy = _numpy()
        if isinstance(value, torch.Tensor):
            out[path] = tensor_digest(value)
        elif isinstance(value, Mapping):
            if not value:
                out[path] = "{}"
            for key, item in value.items():
                visit(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
            if value and all(isinstance(v, (bool, int, float, str)) or v is None for v in value):
                # numbers side by side (a generator's state words, betas): one entry
                out[path] = _join({str(i): _scalar_text(v) for i, v in enumerate(value)}, type(value).__name__)
                return
            if not value:
                out[path] = f"{type(value).__name__}:empty"
            for i, item in enumerate(value):
                visit(item, f"{path}.{i}" if path else str(i))
        elif numpy is not None and isinstance(value, numpy.ndarray):
            out[path] = tensor_digest(torch.from_numpy(value.copy()))
        else:
            out[path] = _scalar_text(value.item() if numpy is not None and isinstance(value, numpy.generic) else value)

    visit(state, prefix)
    return out


def batch_fingerprint(batch: Any) -> str:
    """One digest of everything in a batch (tensors by their bytes, the rest by value)."""
    digest = hashlib.blake2b(digest_size=12)
    for path, leaf in sorted(state_fingerprints(batch, "batch").items()):
        digest.update(f"{path}={leaf};".encode())
    return digest.hexdigest()


class Attribute(NamedTuple):
    """One inspected attribute: its digest, a short description of its value for the report,
    and what kind of thing it is ("generator", "module", "tensor", "number", "container")."""

    digest: str
    shown: str
    kind: str


def _is_generator(value: Any) -> bool:
    numpy = _numpy()
    if isinstance(value, (torch.Generator, random.Random)):
        return True
    return numpy is not None and isinstance(value, (numpy.random.RandomState, numpy.random.Generator))


def _generator_state(value: Any) -> Any:
    if isinstance(value, torch.Generator):
        return {"device": str(value.device), "state": value.get_state()}
    if isinstance(value, random.Random):
        return value.getstate()
    if isinstance(value, _numpy().random.RandomState):
        return value.get_state(legacy=False)
    return value.bit_generator.state


#: torch objects whose state is their `state_dict()` (a DataLoader's is not read: asking a
#: StatefulDataLoader for it creates an iterator, which changes what it yields next).
_STATEFUL = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler)


class _Skip(Exception):
    """A value holds something check_resume does not look into."""


def _digest_value(value: Any, large: bool, depth: int = 0) -> str:
    """A digest of an inspectable value; `_Skip` for anything else. `large=False` gives
    large tensors a placeholder (their identity and version counter) instead of hashing them."""
    if depth > _MAX_DEPTH:
        raise _Skip
    numpy = _numpy()
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return _scalar_text(value)
    if isinstance(value, torch.Tensor):
        if not large and value.numel() > LARGE_TENSOR:
            return f"large:{value.dtype}{tuple(value.shape)}"
        return tensor_digest(value)
    if numpy is not None and isinstance(value, numpy.generic):
        return _scalar_text(value.item())
    if numpy is not None and isinstance(value, numpy.ndarray):
        if value.dtype == object:
            raise _Skip
        return tensor_digest(torch.from_numpy(value.copy()))
    if isinstance(value, torch.Size):
        return repr(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if _is_generator(value):
        return _join(state_fingerprints(_generator_state(value)))
    if isinstance(value, _STATEFUL):  # a second optimizer, scheduler or scaler of the user's
        return _join(state_fingerprints(value.state_dict()), type(value).__qualname__)
    if isinstance(value, nn.Module):
        state = value.state_dict()
        if not large and sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor)) > LARGE_TENSOR:
            return f"large:module:{type(value).__name__}"
        return _join(state_fingerprints(state))
    if isinstance(value, Mapping):
        if len(value) > _MAX_ITEMS:
            raise _Skip
        return _join({repr(k): _digest_value(v, large, depth + 1) for k, v in value.items()})
    if isinstance(value, (list, tuple, collections.deque)):
        if len(value) > _MAX_ITEMS:
            raise _Skip
        return _join({str(i): _digest_value(v, large, depth + 1) for i, v in enumerate(value)}, type(value).__name__)
    if isinstance(value, (set, frozenset)):
        if len(value) > _MAX_ITEMS:
            raise _Skip
        return _join({str(i): d for i, d in enumerate(sorted(_digest_value(v, large, depth + 1) for v in value))})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return _join({k: _digest_value(v, large, depth + 1) for k, v in fields.items()}, type(value).__qualname__)
    if isinstance(value, types.SimpleNamespace):
        return _join({k: _digest_value(v, large, depth + 1) for k, v in vars(value).items()}, "namespace")
    raise _Skip


def _join(parts: Mapping[str, str], kind: str = "") -> str:
    digest = hashlib.blake2b(kind.encode(), digest_size=12)
    for key, part in parts.items():
        digest.update(f"{key}={part};".encode())
    return digest.hexdigest()


def kind_of(value: Any) -> str:
    """What kind of thing an inspectable value is, for the report's hints."""
    if _is_generator(value):
        return "generator"
    if isinstance(value, nn.Module):
        return "module"
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, _STATEFUL):
        return "optimizer or scheduler"
    numpy = _numpy()
    if isinstance(value, (bool, int, float, complex)) or value is None or (
            numpy is not None and isinstance(value, numpy.generic)):
        return "number"
    if isinstance(value, (str, bytes)):
        return "text"
    return "container"


def describe(value: Any) -> str:
    """A short text of an inspectable value for the report (cheap for large containers)."""
    if _is_generator(value):
        name = f"{type(value).__module__}.{type(value).__qualname__}"
        name = "torch.Generator" if isinstance(value, torch.Generator) else name
        return f"{name} in state {_join(state_fingerprints(_generator_state(value)))[:8]}"
    if isinstance(value, (nn.Module, *_STATEFUL)):
        return f"a {type(value).__name__}"
    if isinstance(value, torch.Tensor):
        return f"tensor({value.item()!r})" if value.numel() == 1 else f"a tensor of shape {tuple(value.shape)}"
    numpy = _numpy()
    if numpy is not None and isinstance(value, numpy.generic):
        return repr(value.item())
    if isinstance(value, (str, bytes)):
        return repr(value) if len(value) <= 40 else repr(value[:37]) + "..."
    if isinstance(value, (bool, int, float, complex)) or value is None:
        return repr(value)
    try:
        size = len(value)
    except TypeError:
        size = None
    scalars = isinstance(value, (list, tuple, set, frozenset, collections.deque)) and size is not None and size <= 8 \
        and all(isinstance(v, (bool, int, float, str)) or v is None for v in value)
    if scalars and len(text := repr(value)) <= 60:
        return text
    return f"a {type(value).__name__}" + (f" of {size}" if size is not None else "")


def inspect_value(value: Any, large: bool = True, shown: bool = True) -> Attribute | None:
    """The `Attribute` of an inspectable value, or None when it is not one (`shown=False`:
    without the report's text, which the per-step records do not need)."""
    try:
        digest = _digest_value(value, large)
    except _Skip:
        return None
    except Exception:  # noqa: BLE001 - a value whose state cannot be read is not inspected
        return None
    return Attribute(digest, describe(value) if shown else "", kind_of(value))
