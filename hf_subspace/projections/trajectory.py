"""Trajectory projection: a stored orthonormal basis built from weight snapshots (TWA / DLDR).

Unlike the random kinds, ``P`` cannot be regenerated from a seed: it is a ``(k, D)`` matrix ``basis`` with
orthonormal rows (``basis @ basisᵀ = I_k``), built by :func:`hf_subspace.twa.build_trajectory_basis` and saved
with the adapter. ``P = basisᵀ`` (shape ``(D, k)``), so

* ``P c  = basisᵀ c``  — ``(k,)`` -> ``(D,)``,
* ``Pᵀ g = basis @ g`` — ``(D,)`` -> ``(k,)``,

and ``PᵀP = I``: the columns of ``P`` are orthonormal over the whole of θ, as the base class requires.

Sharding (open for later, no communication here): with ``row_range=(r0, r1)`` a process holds only rows
``r0:r1`` of the ``k``-row basis. ``matvec`` then returns this process's *partial* sum
``basis[r0:r1]ᵀ c[r0:r1]`` and ``rmatvec`` returns a ``(k,)`` vector that is zero outside ``r0:r1``; summing
either over all processes (one all-reduce) gives the full product. Without ``row_range`` the whole basis is held.
"""
from __future__ import annotations

import torch

from .base import Projection

CHUNK_ELEMENTS = 1 << 22  # columns are processed in blocks of about this many basis entries


class TrajectoryProjection(Projection):
    """``P = basisᵀ`` for a ``(k, D)`` basis with orthonormal rows.

    Args:
        basis: ``(k, D)`` (or ``(r1 - r0, D)`` with ``row_range``) floating tensor with orthonormal rows. Stored
            as float32 unless it is float64 (kept as float64, for checks that need it).
        device: where the basis lives and products are computed (default: CPU).
        row_range: optional ``(r0, r1)``: ``basis`` holds rows ``r0:r1`` of a ``k``-row basis (``k`` = ``total_rows``).
        total_rows: ``k`` when ``row_range`` is given (default ``r1``).
    """

    kind = "trajectory"

    def __init__(
        self,
        basis: torch.Tensor,
        device: torch.device | str | None = None,
        row_range: tuple[int, int] | None = None,
        total_rows: int | None = None,
    ):
        if not isinstance(basis, torch.Tensor) or basis.dim() != 2:
            raise ValueError(f"basis must be a 2-D tensor of shape (k, D), got {getattr(basis, 'shape', basis)!r}")
        if not basis.is_floating_point():
            raise ValueError(f"basis must be floating point, got dtype {basis.dtype}")
        local_rows, D = basis.shape
        r0, r1, k = _resolve_rows(local_rows, row_range, total_rows)
        super().__init__(int(D), int(k), seed=0, device=device)
        self.row_range = (r0, r1) if row_range is not None else None
        dtype = torch.float64 if basis.dtype == torch.float64 else torch.float32
        self.basis = basis.detach().to(self.device, dtype).contiguous()
        self.chunk_columns = max(1, CHUNK_ELEMENTS // max(1, local_rows))

    @classmethod
    def empty(cls, D: int, k: int, device: torch.device | str | None = None) -> "TrajectoryProjection":
        """A zero ``(k, D)`` placeholder, to be filled by :meth:`load_state_tensors` (e.g. from an adapter file)."""
        if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in (D, k)):
            raise ValueError(f"D and k must be positive integers, got D={D!r}, k={k!r}")
        if k > D:  # refused before the k x D zeros are allocated
            raise ValueError(f"k={k} directions is larger than the number of weights D={D}")
        return cls(torch.zeros(k, D, dtype=torch.float32, device="cpu"), device=device)

    # -- products ---------------------------------------------------------------------------------------------
    def _local_rows(self) -> slice:
        r0, r1 = self.row_range if self.row_range is not None else (0, self.d)
        return slice(r0, r1)

    def _column_chunks(self):
        for a in range(0, self.D, self.chunk_columns):
            yield a, min(a + self.chunk_columns, self.D)

    def _matvec(self, c: torch.Tensor) -> torch.Tensor:
        c_local = c[self._local_rows()].to(self.basis.dtype)
        if self.basis.dtype == torch.float32:
            return c_local @ self.basis  # (D,), no temporaries beyond the output
        out = torch.empty(self.D, device=self.device, dtype=torch.float32)
        for a, b in self._column_chunks():
            out[a:b] = c_local @ self.basis[:, a:b]
        return out

    def _rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.d, device=self.device, dtype=torch.float32)
        if self.basis.dtype == torch.float32:
            out[self._local_rows()] = self.basis @ g
            return out
        acc = torch.zeros(self.basis.shape[0], device=self.device, dtype=torch.float64)
        for a, b in self._column_chunks():
            acc += self.basis[:, a:b] @ g[a:b].double()
        out[self._local_rows()] = acc.float()
        return out

    # -- state ------------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``{"basis": (k, D)}`` — the basis is data, not regenerable, so it must be saved with the adapter."""
        return {"basis": self.basis}

    def orthonormality_error(self) -> float:
        """``max |basis basisᵀ - I|`` computed in float64 on the stored basis (a check; costs one pass)."""
        rows = self.basis.shape[0]
        gram = torch.zeros(rows, rows, dtype=torch.float64, device=self.device)
        for a, b in self._column_chunks():
            block = self.basis[:, a:b].double()
            gram += block @ block.T
        eye = torch.eye(rows, dtype=torch.float64, device=self.device)
        return float((gram - eye).abs().max())

    def __repr__(self) -> str:
        extra = f", row_range={self.row_range}" if self.row_range is not None else ""
        return (f"{type(self).__name__}(D={self.D}, d={self.d}, dtype={self.basis.dtype}, "
                f"device={self.device}{extra})")


def _resolve_rows(local_rows: int, row_range, total_rows) -> tuple[int, int, int]:
    """Check ``row_range`` against the basis; return ``(r0, r1, k)``."""
    if row_range is None:
        if total_rows is not None and total_rows != local_rows:
            raise ValueError(f"total_rows={total_rows} given without row_range, but the basis has {local_rows} rows")
        return 0, local_rows, local_rows
    r0, r1 = (int(r) for r in row_range)
    k = int(total_rows) if total_rows is not None else r1
    if not (0 <= r0 < r1 <= k) or r1 - r0 != local_rows:
        raise ValueError(
            f"row_range={tuple(row_range)} (total_rows={k}) does not fit a local basis of {local_rows} rows"
        )
    return r0, r1, k
