"""The TWA basis sharded across processes by coordinates: each rank keeps all k directions for its slice of θ.

Under DDP the snapshots are the same on every rank, so the ``(k, D)`` basis need not be whole on each: rank ``r``
keeps columns ``[r·s, (r+1)·s)`` (``s = ⌈D/N⌉``, the last shard zero-padded), about ``k·D/N`` floats, the way FSDP
shards parameters. The algorithm is :mod:`hf_subspace.twa.basis`'s (float64 Gram, eigen-decomposition, a Cholesky
re-orthogonalization pass), each pass over this rank's coordinates only, its ``n × n`` (then ``k × k``) Gram
matrices summed over ranks with one all-reduce each. No rank ever holds the whole basis, building included.

Training with it (:class:`ShardedTrajectoryProjection`), per step:

* ``P c``: each rank computes its slice ``Q_rᵀ c`` and one all-gather assembles θ's delta (``D`` floats);
* ``Pᵀ g``: every rank has its own gradient ``g`` of the whole θ; one reduce-scatter gives rank ``r`` the sum over
  ranks of its slice, ``Q_r`` times it is a k-vector, and one all-reduce of k numbers sums the slices: the mean over
  ranks of ``Pᵀ g_rank``, identical on every rank (DDP's own all-reduce of c's gradient then changes nothing).

That is an all-gather and a reduce-scatter of ``D`` floats per step (what FSDP pays), against ``4·k`` bytes when the
basis is whole on every rank: the trade is ``k·D·(N-1)/N`` floats of memory per rank for ``2·D`` floats of traffic.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..projections.base import Projection
from .basis import (TrajectoryBasisResult, _iter_blocks, _number_to_keep, _principal_directions, _tensor_getter,
                    _validate)


def shard_size(D: int, world: int) -> int:
    """Columns per shard: ``⌈D / world⌉`` (the last shard is zero-padded to it)."""
    return -(-D // world)


def _world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _all_gather_single(out, local, group=None):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, local, group=group)


def _reduce_scatter_single(out, full, group=None):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, full, op=dist.ReduceOp.SUM, group=group)


def _sum_over_ranks(t: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce (sum) ``t`` in place, then take rank 0's bits so every rank decides on exactly the same matrix."""
    if _world(group)[1] > 1:
        dist.all_reduce(t, group=group)
        dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return t


def _iter_range(get, n, names, shapes, chunk_size, lo, hi):
    """Yield ``(a, b, X)`` for the flat coordinates ``[lo, hi)`` of θ: ``X`` is the ``(n, b - a)`` float64 block of
    coordinates ``lo + a .. lo + b`` (a view of one reused buffer)."""
    buffer = torch.empty(n, max(1, min(chunk_size, hi - lo)), dtype=torch.float64)
    offset = 0
    for name in names:
        numel = math.prod(shapes[name])
        a0, b0 = max(lo, offset), min(hi, offset + numel)
        if a0 < b0:
            flats = [get(i, name).detach().reshape(-1) for i in range(n)]
            for a in range(a0, b0, chunk_size):
                b = min(a + chunk_size, b0)
                X = buffer[:, : b - a]
                for i, f in enumerate(flats):
                    X[i].copy_(f[a - offset: b - offset])
                yield a - lo, b - lo, X
            del flats
        offset += numel


def build_sharded_trajectory_basis(snapshots, names=None, method: str = "twa", k: int | None = None,
                                   chunk_size: int = 1 << 22, rtol: float = 1e-5, center: bool = True,
                                   group=None) -> TrajectoryBasisResult:
    """:func:`~hf_subspace.twa.build_trajectory_basis` with the basis sharded by coordinates over ``group``.

    A collective: every rank calls it with the same snapshots. Returns a :class:`TrajectoryBasisResult` whose
    ``projection`` is a :class:`ShardedTrajectoryProjection` (this rank's ``(k, ⌈D/N⌉)`` shard) and whose ``mean``
    is whole (the model is whole on every rank under DDP). With one process the shard is the whole basis.
    """
    from .basis import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    names, shapes = _validate(snapshots, names)
    n = len(snapshots)
    get = _tensor_getter(snapshots)
    rank, world = _world(group)
    D = sum(math.prod(shapes[name]) for name in names)
    size = shard_size(D, world)
    lo, hi = min(D, rank * size), min(D, (rank + 1) * size)

    mean = {name: torch.empty(shapes[name], dtype=torch.float32) for name in names}
    for name, a, b, X in _iter_blocks(get, n, names, shapes, chunk_size):  # the mean, whole: D floats
        mean[name].view(-1)[a:b] = X.mean(0).float()

    def centered(X):
        if center:
            X -= X.mean(0)
        return X

    gram = torch.zeros(n, n, dtype=torch.float64)
    for _, _, X in _iter_range(get, n, names, shapes, chunk_size, lo, hi):
        X = centered(X)
        gram += X @ X.T
    if not torch.isfinite(_sum_over_ranks(gram, group).diagonal()).all():
        raise ValueError("the snapshots hold NaN or inf")
    eigvals, eigvecs = _principal_directions(gram)
    keep = _number_to_keep(eigvals, method, k, rtol)
    T = eigvecs[:, :keep] / eigvals[:keep].sqrt()

    g2 = torch.zeros(keep, keep, dtype=torch.float64)
    for _, _, X in _iter_range(get, n, names, shapes, chunk_size, lo, hi):
        q1 = T.T @ centered(X)
        g2 += q1 @ q1.T
    L, info = torch.linalg.cholesky_ex(_sum_over_ranks((g2 + g2.T) / 2, group))
    if int(info) != 0:  # pragma: no cover - cannot happen above the rank tolerance
        raise ValueError("the snapshot directions are numerically dependent; raise rtol")
    M = torch.linalg.solve_triangular(L, T.T, upper=False)

    shard = torch.zeros(keep, size, dtype=torch.float32)
    ortho = torch.zeros(keep, keep, dtype=torch.float64)
    for a, b, X in _iter_range(get, n, names, shapes, chunk_size, lo, hi):
        q = M @ centered(X)
        shard[:, a:b].copy_(q)
        q.copy_(shard[:, a:b])
        ortho += q @ q.T
    err = float((_sum_over_ranks(ortho, group) - torch.eye(keep, dtype=torch.float64)).abs().max())
    total = eigvals.clamp_min(0).sum()
    return TrajectoryBasisResult(
        mean=mean, projection=ShardedTrajectoryProjection(shard, D, group=group), names=names,
        singular_values=eigvals[:keep].sqrt(), explained_variance_ratio=eigvals[:keep] / total, shapes=shapes,
        method=method, num_snapshots=n, orthonormality_error=err)


class ShardedTrajectoryProjection(Projection):
    """``P = Qᵀ`` for a ``(k, D)`` orthonormal basis ``Q`` of which this rank holds columns ``[r·s, (r+1)·s)``.

    ``matvec`` and ``rmatvec`` are collectives (every rank of ``group`` calls them, in the same order); see the
    module docstring. ``rmatvec(g)`` returns the mean over ranks of ``Pᵀ g_rank`` (``Pᵀ g`` when every rank passes
    the same ``g``).
    """

    kind = "trajectory"
    sharded = True

    def __init__(self, shard: torch.Tensor, D: int, group=None, device=None):
        k, size = shard.shape
        super().__init__(D, k, seed=0, device=device)
        self.group = group
        self.rank, self.world = _world(group)
        if size != shard_size(D, self.world):
            raise ValueError(f"a shard of {size} columns does not split D={D} over {self.world} processes")
        self.shard = shard.detach().to(self.device, torch.float32).contiguous()
        self.size = size

    @property
    def basis(self) -> torch.Tensor:
        raise ValueError(f"this TWA basis is sharded over {self.world} processes (each holds {self.size} of its "
                         f"D={self.D} columns); full_basis() gathers it (a collective: call it on every rank)")

    def state_bytes(self) -> int:
        """Bytes this rank holds for the basis: ``k · ⌈D/N⌉ · 4``."""
        return self.shard.numel() * self.shard.element_size()

    def full_basis(self) -> torch.Tensor:
        """The whole ``(k, D)`` basis on every rank (one all-gather; for saving, not for training)."""
        parts = [torch.empty_like(self.shard) for _ in range(self.world)]
        if self.world > 1:
            dist.all_gather(parts, self.shard, group=self.group)
        else:
            parts = [self.shard]
        return torch.cat(parts, dim=1)[:, : self.D].contiguous()

    def gather_basis(self, dst: int = 0) -> torch.Tensor | None:
        """The whole ``(k, D)`` basis on rank ``dst`` only (None elsewhere): one gather (a collective)."""
        if self.world == 1:
            return self.shard[:, : self.D].contiguous()
        parts = [torch.empty_like(self.shard) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(self.shard, parts, dst=dst, group=self.group)
        return torch.cat(parts, dim=1)[:, : self.D].contiguous() if self.rank == dst else None

    def _matvec(self, c):
        local = c @ self.shard  # (size,)
        if self.world == 1:
            return local[: self.D]
        out = torch.empty(self.size * self.world, device=self.device, dtype=torch.float32)
        _all_gather_single(out, local.contiguous(), self.group)
        return out[: self.D]

    def _rmatvec(self, g):
        if self.world == 1:
            return self.shard[:, : self.D] @ g
        full = torch.zeros(self.size * self.world, device=self.device, dtype=torch.float32)
        full[: self.D] = g
        mine = torch.empty(self.size, device=self.device, dtype=torch.float32)
        _reduce_scatter_single(mine, full, self.group)  # Σ_ranks of g's slice r
        out = self.shard @ mine  # (k,)
        dist.all_reduce(out, group=self.group)
        return out / self.world

    def _move(self, device):
        self.shard = self.shard.to(device)

    def state_tensors(self):
        return {}

    def __repr__(self):
        return (f"ShardedTrajectoryProjection(k={self.d}, D={self.D}, shard {self.rank}/{self.world} of "
                f"{self.size} columns, device={self.device})")
