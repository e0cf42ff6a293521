"""Linear maps ``R^d -> R^D`` behind one interface (:class:`Projection`): ``P c``, ``Pᵀ g``, ``D``, ``d``.

Random kinds are rebuilt from ``(kind, D, d, seed)``; see :func:`make_projection`.
"""
from __future__ import annotations

from .base import Projection
from .dense import DenseProjection
from .fastfood import FastfoodProjection
from .fastfood_v1 import FastfoodProjectionV1
from .hashing import HashingProjection
from .hashing_v1 import HashingProjectionV1
from .sparse import SparseProjection
from .trajectory import TrajectoryProjection

PROJECTION_KINDS = {
    "hashing": HashingProjection,
    "fastfood": FastfoodProjection,
    "sparse": SparseProjection,
    "dense": DenseProjection,
}


#: every format of every kind: a format changes which ``P`` a seed gives, so adapters record theirs
#: (``SubspaceConfig.projection_format``) and are rebuilt with it; the highest is what new adapters get
PROJECTION_FORMATS = {kind: {getattr(cls, "format", 1): cls} for kind, cls in PROJECTION_KINDS.items()}
PROJECTION_FORMATS["hashing"][1] = HashingProjectionV1
PROJECTION_FORMATS["fastfood"][1] = FastfoodProjectionV1


def latest_format(kind: str) -> int:
    """The format new adapters of ``kind`` are built in."""
    return max(PROJECTION_FORMATS.get(kind, {1: None}))


#: kinds that are data, not regenerable from a seed: an adapter of such a kind must be saved with its projection
STORED_KINDS = {"trajectory": TrajectoryProjection}


def make_projection(kind: str, D: int, d: int, seed: int = 0, device=None, format: int | None = None,
                    **options) -> Projection:
    """Build the projection ``kind`` (one of :data:`PROJECTION_KINDS`) of shape ``D x d`` from ``seed``.

    ``format`` picks one of the kind's formats (:data:`PROJECTION_FORMATS`; default: the latest), so an adapter
    saved by an older version is rebuilt with the very ``P`` it was trained in.

    A stored kind (``"trajectory"``) comes back as an all-zero placeholder to be filled with
    :meth:`Projection.load_state_tensors` (what loading an adapter file does).
    """
    if kind in STORED_KINDS:
        return STORED_KINDS[kind].empty(D, d, device=device)
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"unknown projection kind {kind!r}; choose one of {sorted(PROJECTION_KINDS)}")
    formats = PROJECTION_FORMATS[kind]
    if format is None:
        format = latest_format(kind)
    if format not in formats:
        raise ValueError(f"{kind} projection format {format!r} is unknown to this version of hf_subspace (it knows "
                         f"{sorted(formats)}); the adapter was saved by a newer version: upgrade hf_subspace")
    return formats[format](D, d, seed=seed, device=device, **options)


__all__ = [
    "PROJECTION_KINDS",
    "DenseProjection",
    "FastfoodProjection",
    "FastfoodProjectionV1",
    "HashingProjection",
    "HashingProjectionV1",
    "PROJECTION_FORMATS",
    "Projection",
    "STORED_KINDS",
    "SparseProjection",
    "TrajectoryProjection",
    "latest_format",
    "make_projection",
]
