"""Gradient compression for PhaseTrainer: packed ternary codes and VSA hypervectors.

Ternary: a tensor g becomes trits t in {-1, 0, +1} and one scale s per tensor, g ~ s * t,
stored 4 trits per byte (2 bits each), so 16x smaller than float32 in fact, not in name.
  "stochastic": s = max|g|, t = sign(g) with probability |g| / s (else 0): E[s t] = g.
  "threshold":  t = sign(g) where |g| > threshold * max|g|, s = mean |g| over those kept.

VSA: all gradients of a model, flattened, go through a seeded count-sketch projection to
D = dim_ratio * N numbers (each coordinate added, with a random sign, to one of D slots; a
very sparse random projection that is never stored, only re-drawn from its seed), which
are then ternarised (kept where above `threshold` x their mean magnitude) and packed, and
optionally bound to a key (elementwise sign flips) so that several codes can be bundled
into one hypervector. Decompression projects back (the transpose). Quality is measured,
not assumed: `reconstruction_cosine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..utils import check_int, check_number
from .seeded_generator import SeededGenerator

__all__ = [
    "TernaryCode",
    "ternarize",
    "TernaryGradientAccumulator",
    "VSACode",
    "VSAGradientCompressor",
    "reconstruction_cosine",
    "gradient_cosine",
]

_MODES = ("stochastic", "threshold")
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


@dataclass
class TernaryCode:
    """Trits packed 4 per byte (code 0 -> 0, 1 -> +1, 2 -> -1) and the scale."""

    packed: torch.Tensor  # uint8, ceil(numel / 4)
    scale: torch.Tensor  # 0-d float32
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 4

    def decode(self) -> torch.Tensor:
        codes = (self.packed.unsqueeze(1) >> _SHIFTS.to(self.packed.device)) & 3
        codes = codes.reshape(-1)[: self.shape.numel()]
        trits = (codes == 1).to(torch.float32) - (codes == 2).to(torch.float32)
        return (trits * self.scale).reshape(self.shape).to(self.dtype)


def ternarize(
    g: torch.Tensor,
    mode: str = "stochastic",
    threshold: float | torch.Tensor = 0.5,
    generator: torch.Generator | None = None,
) -> TernaryCode:
    """Quantise `g` to a packed `TernaryCode` (see the module docstring for the modes;
    `threshold` may be a device scalar, so that no value is read back to the host)."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}; got {mode!r}")
    flat = g.detach().reshape(-1).float()
    magnitude = flat.abs()
    peak = magnitude.max() if flat.numel() else torch.zeros((), device=flat.device)
    safe_peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    if mode == "stochastic":
        keep = torch.rand(flat.shape, generator=generator, device=flat.device) < magnitude / safe_peak
        scale = peak
    else:
        keep = magnitude > threshold * peak
        kept = keep.sum()
        scale = torch.where(kept > 0, (magnitude * keep).sum() / kept.clamp_min(1), torch.zeros_like(peak))
    codes = torch.where(keep, torch.where(flat >= 0, 1, 2), 0).to(torch.uint8)
    pad = (-codes.numel()) % 4
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    codes = codes.reshape(-1, 4) << _SHIFTS.to(codes.device)
    packed = codes[:, 0] | codes[:, 1] | codes[:, 2] | codes[:, 3]
    return TernaryCode(packed, scale.float(), g.shape, g.dtype)


class TernaryGradientAccumulator:
    """A running sum of gradients held as packed trits between additions.

    `add(grads)` decodes the sum, adds, and re-quantises (stochastic mode keeps the sum
    unbiased); `total()` returns it as tensors and `reset()` clears it. Between two
    additions it holds 2 bits per value plus a scale per tensor, instead of float32.
    """

    def __init__(self, mode: str = "stochastic", threshold: float = 0.5, seed: int = 0) -> None:
        if mode not in _MODES:
            raise ValueError(f"TernaryGradientAccumulator.mode must be one of {_MODES}; got {mode!r}")
        check_number("TernaryGradientAccumulator.threshold", threshold, positive=True)
        check_int("TernaryGradientAccumulator.seed", seed)
        self.mode = mode
        self.threshold = float(threshold)
        self.seed = seed
        self._rng = SeededGenerator(seed)  # on the gradients' device, made at first use
        self.codes: list[TernaryCode] | None = None
        self.count = 0

    def add(self, grads: Sequence[torch.Tensor]) -> None:
        totals = self.total() if self.codes is not None else None
        if totals is not None and len(totals) != len(grads):
            raise ValueError(f"add() got {len(grads)} gradients; the accumulator holds {len(totals)}")
        summed = grads if totals is None else torch._foreach_add(totals, [g.detach() for g in grads])
        self.codes = [self._quantize(g) for g in summed]
        self.count += 1

    @property
    def generator(self) -> torch.Generator | None:
        """The quantiser's own RNG (None until the first `add`)."""
        return self._rng.generator

    def _quantize(self, g: torch.Tensor) -> TernaryCode:
        return ternarize(g, self.mode, self.threshold, self._rng.on(g.device))

    def state_dict(self) -> dict:
        """The quantiser's RNG (the running sum is empty between optimizer steps)."""
        rng_state, device_type = self._rng.get_state()
        return {"generator": rng_state, "device": device_type}

    def load_state_dict(self, state: dict) -> None:
        self._rng.set_state(state.get("generator"), state.get("device"))

    def total(self) -> list[torch.Tensor] | None:
        return None if self.codes is None else [code.decode() for code in self.codes]

    def reset(self) -> None:
        self.codes = None
        self.count = 0

    @property
    def nbytes(self) -> int:
        return sum(code.nbytes for code in self.codes or [])


@dataclass
class VSACode:
    """One compressed gradient set: the packed ternary hypervector and its key slot."""

    code: TernaryCode
    slot: int | None  # the key it is bound to (None: unbound)

    @property
    def nbytes(self) -> int:
        return self.code.nbytes


class VSAGradientCompressor:
    """Compress a list of gradient tensors to one ternary hypervector of `dim_ratio` x
    their total size (see the module docstring), and back.

    Memory per code: 2 bits x D, i.e. `dim_ratio / 16` of float32 gradients. The
    projection is re-drawn from `seed` on each use, so it costs no memory.
    """

    def __init__(self, dim_ratio: float = 0.25, seed: int = 0, threshold: float = 1.0) -> None:
        check_number("VSAGradientCompressor.dim_ratio", dim_ratio, positive=True)
        check_int("VSAGradientCompressor.seed", seed)
        check_number("VSAGradientCompressor.threshold", threshold, positive=True)
        self.dim_ratio = float(dim_ratio)
        self.seed = seed
        self.threshold = float(threshold)
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor, int] | None = None

    def _projection(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Bucket and sign of each of the n coordinates, drawn from the seed (the last
        one drawn is kept: N int32 + N int8, much less than one float32 gradient)."""
        if self._cache is not None and self._cache[0] == n and self._cache[1] == device:
            return self._cache[2], self._cache[3], self._cache[4]
        dim = max(1, int(round(self.dim_ratio * n)))
        generator = torch.Generator().manual_seed(self.seed)
        buckets = torch.randint(0, dim, (n,), generator=generator, dtype=torch.int32).to(device)
        signs = (torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8) * 2 - 1).to(device)
        self._cache = (n, device, buckets, signs, dim)
        return buckets, signs, dim

    def _key(self, slot: int, dim: int, device: torch.device) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * (slot + 1))
        return (torch.randint(0, 2, (dim,), generator=generator) * 2 - 1).to(device=device, dtype=torch.float32)

    def compress(self, grads: Sequence[torch.Tensor], slot: int | None = None) -> VSACode:
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
        buckets, signs, dim = self._projection(flat.numel(), flat.device)
        projected = torch.zeros(dim, device=flat.device).index_add_(0, buckets, flat * signs)
        if slot is not None:
            projected = projected * self._key(slot, dim, flat.device)
        return VSACode(self._ternarize(projected), slot)

    def _ternarize(self, projected: torch.Tensor) -> TernaryCode:
        """Keep the slots above `threshold` x their mean magnitude (the crate's rule)."""
        magnitude = projected.abs()
        relative = self.threshold * magnitude.mean() / magnitude.max().clamp_min(1e-30)
        return ternarize(projected, "threshold", relative)  # a device scalar: no host read

    def decompress(self, code: VSACode, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors shaped like `like` (the gradients' shapes and dtype)."""
        projected = code.code.decode().float()
        n = sum(t.numel() for t in like)
        buckets, signs, dim = self._projection(n, projected.device)
        if projected.numel() != dim:
            raise ValueError(f"this code has {projected.numel()} dimensions; gradients of {n} values need {dim}")
        if code.slot is not None:
            projected = projected * self._key(code.slot, dim, projected.device)
        flat = projected[buckets.long()] * signs
        out, offset = [], 0
        for t in like:
            out.append(flat[offset : offset + t.numel()].reshape(t.shape).to(t.dtype))
            offset += t.numel()
        return out

    def bundle(self, codes: Sequence[VSACode]) -> TernaryCode:
        """Superpose bound codes into one hypervector (majority by sign of the sum):
        `unbundle(bundle, slot)` recovers each, with crosstalk from the others."""
        if not codes or any(c.slot is None for c in codes):
            raise ValueError("bundle() needs codes compressed with a slot (compress(grads, slot=i))")
        total = torch.stack([c.code.decode().float() for c in codes]).sum(0)
        return self._ternarize(total)

    def unbundle(self, bundled: TernaryCode, slot: int) -> VSACode:
        return VSACode(bundled, slot)


def gradient_cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cosine similarity of two gradient lists taken as one vector, as a device scalar
    (no host read, no concatenated copy)."""
    dot = torch.stack([(x.float() * y.float()).sum() for x, y in zip(a, b, strict=False)]).sum()
    norm_a = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([x.float() for x in a])))
    norm_b = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([y.float() for y in b])))
    return dot / (norm_a * norm_b).clamp_min(1e-30)


def reconstruction_cosine(original: Sequence[torch.Tensor], restored: Sequence[torch.Tensor]) -> float:
    """`gradient_cosine` read as a number (a test/benchmark measure)."""
    return float(gradient_cosine(original, restored))
