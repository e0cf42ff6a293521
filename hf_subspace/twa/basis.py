"""Build the trajectory subspace of TWA (Li et al.) or DLDR from weight snapshots.

Given ``n`` snapshots ``w_1..w_n`` of θ (each a dict ``name -> tensor``, flattened in ``names`` order to a vector
of length ``D``):

* ``mean = (1/n) Σ w_i`` — the SWA solution, returned as float32 tensors; training starts there (``c = 0``).
* ``X`` is the ``(n, D)`` matrix of centered snapshots ``w_i - mean``; its rank is at most ``n - 1``.
* ``basis`` is a ``(k, D)`` matrix with orthonormal rows spanning the non-degenerate part of ``span(X)``:
  ``method="twa"`` keeps every direction whose singular value is above ``rtol · σ_max``;
  ``method="pca"`` (DLDR) keeps the top ``k`` principal directions, ordered by variance.

How (CholeskyQR2 on a Gram matrix, streamed over D in chunks):

1. pass 1 — ``G = X Xᵀ`` in float64 (``n × n``), and the mean. ``G = V Λ Vᵀ``; directions with
   ``λ_i ≤ (rtol σ_max)²`` are dropped. ``Q1 = Λ^{-1/2} Vᵀ X`` (never stored) is orthonormal only up to about
   ``ε₆₄ κ²`` because rounding in ``G`` hits the small eigenvalues hardest.
2. pass 2 — ``G2 = Q1 Q1ᵀ`` measured from the data (float64); ``G2 = L Lᵀ`` (Cholesky).
3. pass 3 — ``Q = L⁻¹ Q1 = M X`` written in float32 chunk by chunk, while ``Q Qᵀ`` of the *stored* float32
   basis is accumulated in float64 to report ``orthonormality_error``.

Memory: besides the ``(k, D)`` float32 output and the ``D`` float32 mean, one ``(n, chunk_size)`` float64 block,
plus, for snapshots that are not already float32 tensors in memory, one float32 copy of the current tensor
for each snapshot.

The float32 mean differs from the exact (float64) mean by rounding, ~2⁻²⁴ of each weight; that rounding is
not in the span. Everything else (``w_i - mean``) is, up to the dropped directions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..projections.trajectory import TrajectoryProjection

METHODS = ("twa", "pca")


@dataclass
class TrajectoryBasisResult:
    """The output of :func:`build_trajectory_basis`.

    Attributes:
        mean: ``name -> tensor`` (float32, the snapshots' shapes) — θ0 for subspace training (the SWA point).
        projection: :class:`TrajectoryProjection` with the ``(k, D)`` orthonormal basis, rows in ``names`` order.
        names: the tensors of θ, in the order they are laid out in the flat vector.
        singular_values: ``(k,)`` float64, singular values of the centered snapshot matrix for the kept
            directions, descending (row ``i`` of the basis ≈ principal direction ``i``).
        explained_variance_ratio: ``(k,)`` float64, ``σ_i² / Σ_all σ²`` (sums to ≤ 1; < 1 when directions were
            dropped or truncated).
        shapes: ``name -> shape``.
        method: ``"twa"`` or ``"pca"``.
        num_snapshots: ``n``.
        orthonormality_error: ``max |Q Qᵀ - I|`` of the stored float32 basis, computed in float64.
    """

    mean: dict[str, torch.Tensor]
    projection: TrajectoryProjection
    names: list[str]
    singular_values: torch.Tensor
    explained_variance_ratio: torch.Tensor
    shapes: dict[str, tuple[int, ...]]
    method: str
    num_snapshots: int
    orthonormality_error: float

    @property
    def k(self) -> int:
        """Subspace dimension (rows of the basis)."""
        return self.projection.d

    @property
    def basis(self) -> torch.Tensor:
        """The ``(k, D)`` basis."""
        return self.projection.basis


# ----------------------------------------------------------------------------------------------------------------
# flat vectors
# ----------------------------------------------------------------------------------------------------------------
def flatten_snapshot(
    snapshot: Mapping[str, torch.Tensor], names: Sequence[str], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Concatenate ``snapshot[name].reshape(-1)`` for ``name`` in ``names`` into one ``(D,)`` vector of ``dtype``."""
    missing = [n for n in names if n not in snapshot]
    if missing:
        raise ValueError(f"snapshot has no tensor named {missing[0]!r} ({len(missing)} of {len(names)} names missing)")
    return torch.cat([snapshot[n].detach().reshape(-1).to(dtype) for n in names])


def unflatten(
    vector: torch.Tensor, names: Sequence[str], shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_snapshot`: split a ``(D,)`` vector into ``name -> view of shape``.

    ``shapes`` is a mapping ``name -> shape`` or a sequence of shapes aligned with ``names``.
    """
    shape_list = [tuple(shapes[n]) for n in names] if isinstance(shapes, Mapping) else [tuple(s) for s in shapes]
    if len(shape_list) != len(names):
        raise ValueError(f"got {len(names)} names but {len(shape_list)} shapes")
    sizes = [math.prod(s) for s in shape_list]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"vector of shape {tuple(vector.shape)} does not hold {sum(sizes)} weights of the given shapes")
    pieces = torch.split(vector, sizes)
    return {n: p.view(s) for n, p, s in zip(names, pieces, shape_list)}


# ----------------------------------------------------------------------------------------------------------------
# snapshot access and validation
# ----------------------------------------------------------------------------------------------------------------
def _tensor_getter(snapshots):
    """``get(i, name) -> tensor``; uses a store's lazy ``get_tensor`` when it has one (no full loads)."""
    if hasattr(snapshots, "get_tensor"):
        return snapshots.get_tensor
    return lambda i, name: snapshots[i][name]


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"


def _validate(snapshots, names: Sequence[str] | None) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Check the snapshots agree with each other (and with ``names``); return ``(names, shapes)``."""
    n = len(snapshots)
    if n < 2:
        raise ValueError(f"a trajectory basis needs at least 2 snapshots, got {n}")
    if hasattr(snapshots, "get_tensor") and hasattr(snapshots, "shapes"):  # a SnapshotStore: checked on add()
        store_shapes = dict(snapshots.shapes)
        names = list(snapshots.names) if names is None else list(names)
        for name in names:
            if name not in store_shapes:
                raise ValueError(f"the snapshots have no tensor named {name!r}")
        return names, {name: tuple(store_shapes[name]) for name in names}
    first = snapshots[0]
    if names is None:
        names = list(first.keys())
        for i in range(1, n):
            keys = set(snapshots[i].keys())
            if keys != set(names):
                what = name_difference(keys, names)
                raise ValueError(f"snapshot {i} does not have the same names as snapshot 0: it {what}")
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError("names contains duplicates")
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(n):
        snap = snapshots[i]
        for name in names:
            if name not in snap:
                raise ValueError(f"snapshot {i} has no tensor named {name!r}")
            t = snap[name]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"snapshot {i}: {name!r} is {_describe(t)}, not a tensor")
            if name not in shapes:
                shapes[name] = tuple(t.shape)
            elif tuple(t.shape) != shapes[name]:
                raise ValueError(
                    f"tensor {name!r} has shape {shapes[name]} in snapshot 0 but {tuple(t.shape)} in snapshot {i}"
                )
        _check_dtypes({name: snap[name] for name in names}, where=f"snapshot {i}")
    return names, shapes


def name_difference(keys, reference) -> str:
    """``"lacks tensor 'x'"`` / ``"has an extra tensor 'y'"`` (or both): how ``keys`` differ from ``reference``."""
    keys, reference = set(keys), set(reference)
    missing, extra = sorted(reference - keys), sorted(keys - reference)
    parts = []
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        parts.append(f"lacks tensor {missing[0]!r}{more}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        parts.append(f"has an extra tensor {extra[0]!r}{more}")
    return " and ".join(parts)


def _check_dtypes(tensors: Mapping[str, torch.Tensor], where: str = "snapshot") -> None:
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(
                f"{where}: tensor {name!r} has non-floating dtype {t.dtype}; a trajectory basis is built from "
                "floating-point weights only (pass `names`, or use hf_subspace.twa.trainable_state)"
            )


def _iter_blocks(get, n: int, names: Sequence[str], shapes: Mapping[str, tuple], chunk_size: int):
    """Yield ``(name, a, b, X)``: ``X`` is the ``(n, b - a)`` float64 block of elements ``a:b`` of ``name``.

    ``X`` is a view of one buffer reused for every block (callers may modify it in place, and must not keep it).
    """
    width = min(chunk_size, max(math.prod(shapes[name]) for name in names))
    buffer = torch.empty(n, width, dtype=torch.float64)
    for name in names:
        flats = [get(i, name).detach().reshape(-1) for i in range(n)]
        numel = flats[0].numel()
        for a in range(0, numel, chunk_size):
            b = min(a + chunk_size, numel)
            X = buffer[:, : b - a]
            for i, f in enumerate(flats):
                X[i].copy_(f[a:b])
            yield name, a, b, X
        del flats


# ----------------------------------------------------------------------------------------------------------------
# the basis
# ----------------------------------------------------------------------------------------------------------------
def build_trajectory_basis(
    snapshots: Sequence[Mapping[str, torch.Tensor]],
    names: Sequence[str] | None = None,
    method: str = "twa",
    k: int | None = None,
    chunk_size: int = 1 << 22,
    rtol: float = 1e-5,
    device: torch.device | str | None = None,
    center: bool = True,
) -> TrajectoryBasisResult:
    """Mean and orthonormal basis of the snapshots' trajectory (see the module docstring for the algorithm).

    Args:
        snapshots: ``n ≥ 2`` dicts ``name -> floating tensor`` (or a :class:`~hf_subspace.twa.SnapshotStore`).
        names: the tensors that form θ, in layout order. Default: all names of snapshot 0, in its order (then
            every snapshot must have exactly those names). Given, snapshots may hold more tensors; only these
            are used.
        method: ``"twa"`` keeps all non-degenerate directions (``k``, if given, caps their number, keeping the
            largest); ``"pca"`` keeps the top ``k`` (default: all non-degenerate) and requires ``k ≤`` the rank.
        k: see ``method``.
        chunk_size: elements per snapshot processed at once (bounds the float64 working block to
            ``n × chunk_size``).
        rtol: a direction is degenerate when its singular value is ``≤ rtol · σ_max``.
        device: where the returned projection lives (the construction runs on CPU).
        center: ``True`` spans the differences ``w_i - mean`` (the affine hull of the snapshots, ``n - 1``
            directions); ``False`` spans the snapshots themselves, which adds the direction of the mean — the
            official TWA code's choice (Gram–Schmidt on the raw snapshots): training can then also rescale the
            weights as a whole. Training starts at the mean either way.

    Returns:
        :class:`TrajectoryBasisResult` with ``projection.basis`` of shape ``(k, D)``, float32, orthonormal rows.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
        raise ValueError(f"k must be a positive integer or None, got {k!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    names, shapes = _validate(snapshots, names)
    n = len(snapshots)
    get = _tensor_getter(snapshots)

    mean, gram = _mean_and_gram(get, n, names, shapes, chunk_size, center)
    eigvals, eigvecs = _principal_directions(gram)
    keep = _number_to_keep(eigvals, method, k, rtol)
    T = eigvecs[:, :keep] / eigvals[:keep].sqrt()  # (n, r): Q1 = Tᵀ X
    M = _cholesky_correction(get, n, names, shapes, chunk_size, T, center)  # (r, n): Q = M X
    basis, ortho_err = _write_basis(get, n, names, shapes, chunk_size, M, center)

    total = eigvals.clamp_min(0).sum()
    return TrajectoryBasisResult(
        mean=mean,
        projection=TrajectoryProjection(basis, device=device),
        names=names,
        singular_values=eigvals[:keep].sqrt(),
        explained_variance_ratio=eigvals[:keep] / total,
        shapes=shapes,
        method=method,
        num_snapshots=n,
        orthonormality_error=ortho_err,
    )


def _mean_and_gram(get, n, names, shapes, chunk_size, center=True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pass 1: float32 mean tensors and the ``(n, n)`` float64 Gram matrix of the (centered) snapshots."""
    mean = {name: torch.empty(shapes[name], dtype=torch.float32) for name in names}
    gram = torch.zeros(n, n, dtype=torch.float64)
    for name, a, b, X in _iter_blocks(get, n, names, shapes, chunk_size):
        m = X.mean(0)
        if center:
            X -= m
        block_gram = X @ X.T
        if not torch.isfinite(block_gram.diagonal()).all():  # NaN/inf anywhere reaches the diagonal
            raise ValueError(f"tensor {name!r} holds NaN or inf in at least one snapshot")
        gram += block_gram
        mean[name].view(-1)[a:b] = m.float()
    return mean, gram


def _principal_directions(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the symmetric Gram matrix."""
    eigvals, eigvecs = torch.linalg.eigh((gram + gram.T) / 2)
    return eigvals.flip(0), eigvecs.flip(1)


def _number_to_keep(eigvals: torch.Tensor, method: str, k: int | None, rtol: float) -> int:
    lam_max = float(eigvals[0])
    if not lam_max > 0:
        raise ValueError("all snapshots are identical: their differences span no direction to train in")
    rank = int((eigvals > (rtol**2) * lam_max).sum())
    if method == "pca" and k is not None and k > rank:
        raise ValueError(
            f"method='pca' asked for k={k} components, but the centered snapshots have only {rank} "
            f"non-degenerate directions (singular value > rtol={rtol:g} × the largest)"
        )
    return rank if k is None else min(k, rank)


def _cholesky_correction(get, n, names, shapes, chunk_size, T: torch.Tensor, center=True) -> torch.Tensor:
    """Pass 2: measure ``G2 = Q1 Q1ᵀ`` (``Q1 = Tᵀ X``) and return ``M = L⁻¹ Tᵀ`` with ``G2 = L Lᵀ``."""
    r = T.shape[1]
    g2 = torch.zeros(r, r, dtype=torch.float64)
    for _, _, _, X in _iter_blocks(get, n, names, shapes, chunk_size):
        if center:
            X -= X.mean(0)
        q1 = T.T @ X
        g2 += q1 @ q1.T
    L, info = torch.linalg.cholesky_ex((g2 + g2.T) / 2)
    if int(info) != 0:  # pragma: no cover - cannot happen above the rank tolerance
        raise ValueError("the snapshot directions are numerically dependent; raise rtol")
    return torch.linalg.solve_triangular(L, T.T, upper=False)


def _write_basis(get, n, names, shapes, chunk_size, M: torch.Tensor, center=True) -> tuple[torch.Tensor, float]:
    """Pass 3: ``Q = M X`` into a ``(r, D)`` float32 tensor; returns it and ``max |Q Qᵀ - I|`` (float64)."""
    r = M.shape[0]
    offsets, D = {}, 0
    for name in names:
        offsets[name] = D
        D += math.prod(shapes[name])
    basis = torch.empty(r, D, dtype=torch.float32)
    gram = torch.zeros(r, r, dtype=torch.float64)
    for name, a, b, X in _iter_blocks(get, n, names, shapes, chunk_size):
        if center:
            X -= X.mean(0)
        q = M @ X  # float64
        stored = basis[:, offsets[name] + a: offsets[name] + b]
        stored.copy_(q)  # rounded to float32
        q.copy_(stored)  # the stored values, back in float64
        gram += q @ q.T
    err = float((gram - torch.eye(r, dtype=torch.float64)).abs().max())
    return basis, err


# ----------------------------------------------------------------------------------------------------------------
# analysis
# ----------------------------------------------------------------------------------------------------------------
def effective_rank(matrix_or_singular_values: torch.Tensor) -> float:
    """Effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_i = σ_i / Σ σ`` and ``H`` the Shannon entropy.

    A 1-D input is taken as singular values (non-negative); a 2-D input is a matrix whose singular values are
    computed (float64). Ranges from 1 (one direction) to ``min(shape)`` (all equal); 0.0 for a zero matrix.
    """
    x = torch.as_tensor(matrix_or_singular_values).detach()
    if x.dim() == 2:
        s = torch.linalg.svdvals(x.double())
    elif x.dim() == 1:
        s = x.double()
        if (s < 0).any():
            raise ValueError("singular values must be non-negative")
    else:
        raise ValueError(f"expected a matrix or a vector of singular values, got shape {tuple(x.shape)}")
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))
