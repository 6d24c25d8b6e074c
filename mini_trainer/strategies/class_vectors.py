"""Fixed, well-separated unit vectors, one per class: SPELA's targets.

`class_vectors(num_classes, dim, method="energy", seed=0)` returns a `(num_classes, dim)`
float32 tensor of unit rows, the same for the same arguments.

- "energy" (the paper's choice): the configuration of least electrostatic energy
  `sum over pairs of 1 / ||u - v||` on the unit sphere. When `num_classes <= dim + 1` that
  optimum is known exactly, a regular simplex (every pair at cosine `-1 / (C - 1)`), so it
  is built directly (in a random orientation drawn from `seed`); otherwise the energy is
  minimised by projected gradient descent from random points, in float64, in row blocks so
  that memory stays `O(block * C)` for thousands of classes.
- "random": normalised Gaussian vectors (the paper's weaker baseline).
"""

from __future__ import annotations

import torch

from ..utils import check_choice, check_int

__all__ = ["class_vectors", "min_pairwise_angle"]

_BLOCK = 1024


def class_vectors(num_classes: int, dim: int, method: str = "energy", seed: int = 0, steps: int = 300) -> torch.Tensor:
    """`(num_classes, dim)` unit vectors (float32, CPU), deterministic per arguments."""
    check_int("num_classes", num_classes, minimum=2)
    check_int("dim", dim, minimum=1)
    check_choice("embeddings_method", method, ("energy", "random"))
    check_int("seed", seed)
    check_int("steps", steps, minimum=0)
    generator = torch.Generator().manual_seed(seed)
    if method == "random":
        return _normalise(torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)).float()
    if num_classes <= dim + 1:
        return _simplex(num_classes, dim, generator).float()
    return _minimise_energy(torch.randn(num_classes, dim, generator=generator, dtype=torch.float64), steps).float()


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _simplex(num_classes: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """A regular simplex: the rows of I - 1/C (the centred standard basis of R^C) are
    equidistant, placed in R^dim through random orthonormal columns. When dim = C - 1 they
    first get coordinates in their own (C-1)-dimensional plane."""
    c = num_classes
    centred = torch.eye(c, dtype=torch.float64) - 1.0 / c
    if dim < c:  # dim == c - 1: express the rows in a basis of the plane orthogonal to (1, ..., 1)
        plane, _ = torch.linalg.qr(centred[:, : c - 1])
        centred = centred @ plane
    rotation, _ = torch.linalg.qr(torch.randn(dim, centred.shape[1], generator=generator, dtype=torch.float64))
    return _normalise(centred @ rotation.T)


def _minimise_energy(points: torch.Tensor, steps: int) -> torch.Tensor:
    """Projected gradient descent on sum_{i<j} 1/||u_i - u_j|| over the unit sphere."""
    points = _normalise(points)
    for step in range(steps):
        force = _energy_gradient(points)
        force -= (force * points).sum(1, keepdim=True) * points  # along the sphere only
        scale = force.norm(dim=1).mean().clamp_min(1e-12)
        rate = 0.1 * (1.0 - step / steps) + 0.002  # large moves first, then settle
        points = _normalise(points - rate * force / scale)
    return points


def _energy_gradient(points: torch.Tensor) -> torch.Tensor:
    """d/du_i of sum_{i<j} 1/||u_i - u_j|| = -sum_j w_ij (u_i - u_j) with w_ij = ||u_i - u_j||^-3,
    using ||u_i - u_j||^2 = 2 - 2 u_i.u_j on the sphere: one (block x C) matrix at a time."""
    gradient = torch.empty_like(points)
    for start in range(0, len(points), _BLOCK):
        block = points[start : start + _BLOCK]
        squared = (2.0 - 2.0 * block @ points.T).clamp_min(1e-12)
        weights = squared.pow(-1.5)
        rows = torch.arange(len(block))
        weights[rows, rows + start] = 0.0  # no self-interaction
        gradient[start : start + _BLOCK] = -(block * weights.sum(1, keepdim=True) - weights @ points)
    return gradient


def min_pairwise_angle(vectors: torch.Tensor) -> float:
    """Smallest angle (degrees) between two distinct rows."""
    unit = _normalise(vectors.double())
    cosine = unit @ unit.T
    cosine.fill_diagonal_(-1.0)
    return float(torch.rad2deg(torch.arccos(cosine.max().clamp(-1, 1))))
