"""Linear maps ``R^d -> R^D`` behind one interface (:class:`Projection`): ``P c``, ``Pᵀ g``, ``D``, ``d``.

Random kinds are rebuilt from ``(kind, D, d, seed)``; see :func:`make_projection`.
"""
from __future__ import annotations

from .base import Projection
from .dense import DenseProjection
from .fastfood import FastfoodProjection
from .hashing import HashingProjection
from .sparse import SparseProjection
from .trajectory import TrajectoryProjection

PROJECTION_KINDS = {
    "hashing": HashingProjection,
    "fastfood": FastfoodProjection,
    "sparse": SparseProjection,
    "dense": DenseProjection,
}


#: kinds that are data, not regenerable from a seed: an adapter of such a kind must be saved with its projection
STORED_KINDS = {"trajectory": TrajectoryProjection}


def make_projection(kind: str, D: int, d: int, seed: int = 0, device=None, **options) -> Projection:
    """Build the projection ``kind`` (one of :data:`PROJECTION_KINDS`) of shape ``D x d`` from ``seed``.

    A stored kind (``"trajectory"``) comes back as an all-zero placeholder to be filled with
    :meth:`Projection.load_state_tensors` (what loading an adapter file does).
    """
    if kind in STORED_KINDS:
        return STORED_KINDS[kind].empty(D, d, device=device)
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"unknown projection kind {kind!r}; choose one of {sorted(PROJECTION_KINDS)}")
    return PROJECTION_KINDS[kind](D, d, seed=seed, device=device, **options)


__all__ = [
    "PROJECTION_KINDS",
    "DenseProjection",
    "FastfoodProjection",
    "HashingProjection",
    "Projection",
    "STORED_KINDS",
    "SparseProjection",
    "TrajectoryProjection",
    "make_projection",
]
