"""Fixed, well-separated unit vectors, one per class: SPELA's targets.

`class_vectors(num_classes, dim, method="energy", seed=0)` returns a `(num_classes, dim)`
float32 tensor of unit rows, the same for the same arguments.

- "energy" (the paper's choice): the configuration of least electrostatic energy
  `sum over pairs of 1 / ||u - v||` on the unit sphere. When `num_classes <= dim + 1` that
  optimum is known exactly, a regular simplex (every pair at cosine `-1 / (C - 1)`), so it
  is built directly (in a random orientation drawn from `seed`); otherwise the energy is
  minimised by projected gradient descent from random points, in float64, in row blocks so
  that memory stays `O(block * C)` for thousands of classes.
- "farthest": greedy farthest-point choice (the seed project's default, corrected): the
  first vector is a seeded random unit vector; each next one is, among a seeded pool of
  random unit vectors, the one whose largest cosine to the vectors already chosen is the
  smallest. It keeps every class apart (about 90 degrees or more between any two), but
  it is greedy: the simplex that "energy" builds for classes <= dim + 1 is the optimum
  (arccos(-1 / (C - 1)), e.g. 96.4 degrees for 10 classes).
- "random": normalised Gaussian vectors (the paper's weaker baseline).

`nonnegative_class_vectors(num_classes, dim, seed)`: unit vectors with disjoint supports in
the positive orthant (every pair orthogonal), for layers whose output cannot be negative
(ReLU): there a vector with negative entries cannot be reached, and all outputs share one
large common direction that such vectors favour unequally.
"""

from __future__ import annotations

import torch

from ..utils import check_choice, check_int

__all__ = ["METHODS", "class_vectors", "min_pairwise_angle", "nonnegative_class_vectors"]

METHODS = ("energy", "farthest", "random")

_BLOCK = 1024


def class_vectors(num_classes: int, dim: int, method: str = "energy", seed: int = 0, steps: int = 300) -> torch.Tensor:
    """`(num_classes, dim)` unit vectors (float32, CPU), deterministic per arguments."""
    check_int("num_classes", num_classes, minimum=2)
    check_int("dim", dim, minimum=1)
    check_choice("embeddings_method", method, METHODS)
    check_int("seed", seed)
    check_int("steps", steps, minimum=0)
    generator = torch.Generator().manual_seed(seed)
    if method == "random":
        return _normalise(torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)).float()
    if method == "farthest":
        return _farthest(num_classes, dim, generator).float()
    if num_classes <= dim + 1:
        return _simplex(num_classes, dim, generator).float()
    return _minimise_energy(torch.randn(num_classes, dim, generator=generator, dtype=torch.float64), steps).float()


def nonnegative_class_vectors(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """`(num_classes, dim)` unit vectors >= 0 with disjoint supports: a seeded permutation of
    the dims dealt out to the classes in turn (each gets dim // C or one more). Needs dim >= C."""
    check_int("num_classes", num_classes, minimum=2)
    check_int("dim", dim, minimum=num_classes)
    check_int("seed", seed)
    order = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
    vectors = torch.zeros(num_classes, dim, dtype=torch.float64)
    vectors[torch.arange(dim) % num_classes, order] = 1.0
    return _normalise(vectors).float()


def _farthest(num_classes: int, dim: int, generator: torch.Generator, pool: int = 4096) -> torch.Tensor:
    """Greedy farthest points: a random first vector, then each time the pool candidate whose
    MAXIMUM cosine to the chosen ones is the SMALLEST (the farthest from its nearest)."""
    candidates = _normalise(torch.randn(max(pool, 4 * num_classes), dim, generator=generator, dtype=torch.float64))
    chosen = [_normalise(torch.randn(1, dim, generator=generator, dtype=torch.float64))[0]]
    nearest = candidates @ chosen[0]  # each candidate's largest cosine to the chosen vectors
    taken = torch.zeros(len(candidates), dtype=torch.bool)
    for _ in range(num_classes - 1):
        best = int(nearest.masked_fill(taken, float("inf")).argmin())
        taken[best] = True
        chosen.append(candidates[best])
        nearest = torch.maximum(nearest, candidates @ candidates[best])
    return torch.stack(chosen)


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
