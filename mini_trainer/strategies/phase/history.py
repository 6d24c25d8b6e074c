"""The predictors' memory: the last few full gradients, stored as floats or compressed."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..compression import TernaryCode, VSACode, VSAGradientCompressor, ternarize
from ..seeded_generator import SeededGenerator

__all__ = ["GradientHistory"]


class GradientHistory:
    """The last `window` full gradients with their step, stored as `storage` says.

    "full": float copies in one ring buffer per parameter, shaped (window, *shape), so that
    recording is a copy into a slot and a fit is one matrix product per parameter over all
    slots; `entries` then hold slot numbers. "ternary": packed trits per tensor, rounded
    stochastically with a generator of its own (seeded by `seed`). "vsa": one ternary
    hypervector per entry. `tensors(stored)` gives an entry back as gradient tensors.
    """

    def __init__(self, window: int, storage: str, seed: int, vsa_dim_ratio: float = 0.25) -> None:
        self.window = window
        self.entries: deque[tuple[int, Any]] = deque(maxlen=window)
        self.storage = storage
        self.seed = seed
        self.vsa = VSAGradientCompressor(dim_ratio=vsa_dim_ratio, seed=seed) if storage == "vsa" else None
        self.buffers: list[torch.Tensor] = []  # "full" storage: the ring buffers
        self._next_slot = 0
        self._like: list[torch.Tensor] = []
        self._rng = SeededGenerator(seed)  # the quantiser's: the user's random streams stay untouched

    def add(self, step: int, grads: Sequence[torch.Tensor]) -> None:
        self._like = [torch.empty((), dtype=g.dtype, device=g.device).expand(g.shape) for g in grads]
        if self.storage == "full":
            if [b.shape[1:] for b in self.buffers] != [g.shape for g in grads]:
                self.buffers = [torch.zeros((self.window, *g.shape), dtype=g.dtype, device=g.device) for g in grads]
                self.entries.clear()
                self._next_slot = 0
            stored: Any = self._next_slot
            self._next_slot = (self._next_slot + 1) % self.window
            torch._foreach_copy_([b[stored] for b in self.buffers], [g.detach() for g in grads])
        elif self.storage == "ternary":
            generator = self._rng.on(grads[0].device)
            stored = [ternarize(g, "stochastic", generator=generator) for g in grads]
        else:
            assert self.vsa is not None
            stored = self.vsa.compress(grads)
        self.entries.append((step, stored))

    def tensors(self, stored: Any) -> list[torch.Tensor]:
        if self.storage == "full":
            return [b[stored] for b in self.buffers]  # views: valid until that slot is reused
        if self.storage == "ternary":
            return [code.decode() for code in stored]
        assert self.vsa is not None
        return self.vsa.decompress(stored, self._like)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        total = 0
        for _, stored in self.entries:
            if self.storage == "full":
                total += sum(b[stored].numel() * b.element_size() for b in self.buffers)
            elif self.storage == "ternary":
                total += sum(code.nbytes for code in stored)
            else:
                total += stored.nbytes
        return total

    def state_dict(self) -> dict[str, Any]:
        def encode(stored: Any) -> Any:
            if self.storage == "full":
                return [b[stored].clone() for b in self.buffers]
            if self.storage == "ternary":
                return [_code_state(c) for c in stored]
            return {"code": _code_state(stored.code), "slot": stored.slot}

        rng_state, device_type = self._rng.get_state()
        return {
            "steps": [step for step, _ in self.entries],
            "entries": [encode(stored) for _, stored in self.entries],
            "slots": [stored for _, stored in self.entries] if self.storage == "full" else [],
            "next_slot": self._next_slot,
            "like": [list(t.shape) for t in self._like],
            "dtypes": [str(t.dtype).removeprefix("torch.") for t in self._like],
            "generator": rng_state,
            "generator_device": device_type,
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        def decode(value: Any) -> Any:
            if self.storage == "full":
                return [t.to(device) for t in value]
            if self.storage == "ternary":
                return [_code_from_state(v, device) for v in value]
            return VSACode(_code_from_state(value["code"], device), value["slot"])

        self.entries.clear()
        self._like = [
            torch.empty((), dtype=getattr(torch, dtype), device=device).expand(shape)
            for shape, dtype in zip(state["like"], state["dtypes"], strict=True)
        ]
        self.buffers = []
        if self.storage == "full" and state["steps"]:
            # Back into the very slots they had: a fit adds the slots in buffer order.
            self.buffers = [torch.zeros((self.window, *t.shape), dtype=t.dtype, device=device) for t in self._like]
        slots = state["slots"] or [None] * len(state["steps"])  # only "full" storage has slots
        for step, value, slot in zip(state["steps"], state["entries"], slots, strict=True):
            if self.storage == "full":
                torch._foreach_copy_([b[slot] for b in self.buffers], decode(value))
                self.entries.append((int(step), int(slot)))
            else:
                self.entries.append((int(step), decode(value)))
        self._next_slot = int(state["next_slot"])
        self._rng.set_state(state.get("generator"), state.get("generator_device"))


def _code_state(code: TernaryCode) -> dict[str, Any]:
    dtype = str(code.dtype).removeprefix("torch.")
    return {"packed": code.packed, "scale": code.scale, "shape": list(code.shape), "dtype": dtype}


def _code_from_state(state: Mapping[str, Any], device: torch.device) -> TernaryCode:
    packed, scale = state["packed"].to(device), state["scale"].to(device)
    return TernaryCode(packed, scale, torch.Size(state["shape"]), getattr(torch, state["dtype"]))
