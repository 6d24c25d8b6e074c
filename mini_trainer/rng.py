"""The global random number generators: seeding them, and capturing and restoring their
state so that a resumed run draws exactly the numbers the uninterrupted run would have.

"Global" means what a training loop draws from without saying so: python's `random`,
numpy's legacy global generator (when numpy is installed), torch's CPU generator and the
generator of every CUDA device that has been initialised.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["preserved_rng", "rng_state", "seed_everything", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy (when installed) and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU, every initialised CUDA device)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        # The key array as a tensor: the state then holds only types that safetensors/JSON
        # and `torch.load(weights_only=True)` accept.
        state["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian)
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what `rng_state()` returned (also after a JSON/checkpoint round trip)."""
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"].clone())  # a view with an offset would be misread
    if "numpy" in state:
        import numpy as np

        name, keys, position, has_gauss, cached_gaussian = state["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((name, keys.astype(np.uint32), int(position), int(has_gauss), float(cached_gaussian)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.clone() for s in state["cuda"]])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block without moving the global RNGs: whatever it draws is drawn again
    afterwards by the code that follows."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples back where a JSON round trip made lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
