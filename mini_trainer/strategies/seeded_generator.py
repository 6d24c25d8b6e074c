"""A private, seeded random stream for stochastic quantisation.

The ternary quantisers draw from their own `torch.Generator` rather than the global RNG, so
that turning compression on does not shift the user's random streams (dropout, data order).
"""

from __future__ import annotations

import torch

__all__ = ["SeededGenerator"]


class SeededGenerator:
    """A `torch.Generator` seeded with `seed`, made lazily on the device that first needs it.

    `on(device)` returns it; asked for a device of another type (a model moved from CPU
    to CUDA), it starts afresh there from the seed. `get_state()` / `set_state()` carry it
    through a checkpoint as `(rng_state, device_type)`, both None before first use.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator: torch.Generator | None = None  #: None until first used

    def on(self, device: torch.device) -> torch.Generator:
        """The generator on `device`'s type, made (seeded) at first use."""
        if self.generator is None or self.generator.device.type != device.type:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def get_state(self) -> tuple[torch.Tensor | None, str | None]:
        """(the generator's RNG state, its device type), or (None, None) if never used."""
        if self.generator is None:
            return None, None
        return self.generator.get_state(), self.generator.device.type

    def set_state(self, rng_state: torch.Tensor | None, device_type: str | None) -> None:
        """Back to what `get_state()` returned (None: unused, made afresh at next use)."""
        self.generator = None
        if rng_state is not None:
            self.generator = torch.Generator(device=device_type)
            self.generator.set_state(rng_state.clone())
