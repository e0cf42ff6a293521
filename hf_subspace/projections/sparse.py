"""Very sparse random projection (Li, Hastie & Church 2006), as used by Li et al. 2018.

Each entry is nonzero with probability ``1/s`` (``s = √D`` by default) and then ``±1``; columns are then
scaled to unit length exactly. Stored once as a coalesced COO list (``≈ d·√D`` nonzeros, int32 indices),
applied with one gather and one ``index_add``. Memory ``O(d·√D)``, time ``O(d·√D)`` per product.
"""
from __future__ import annotations

import math

import torch

from .base import Projection, cpu_generator


class SparseProjection(Projection):
    kind = "sparse"

    def __init__(self, D, d, seed=0, device=None, density: float | None = None):
        super().__init__(D, d, seed, device)
        self.density = float(density) if density is not None else 1.0 / math.sqrt(D)
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"sparse projection density must be in (0, 1], got {self.density}")
        nnz_expected = self.density * D * d
        if nnz_expected > 600_000_000:
            raise ValueError(
                f"a very sparse {D}x{d} projection has ~{nnz_expected:.2e} nonzeros "
                f"(~{nnz_expected * 12 / 2**30:.1f} GiB); use projection='hashing' or 'fastfood' at this size"
            )
        # generated on the CPU (CPU random streams are the same on every machine), then moved to the device
        g = cpu_generator(self.seed, stream=1)
        cpu = torch.device("cpu")
        counts = torch.binomial(torch.full((d,), float(D), device=cpu, dtype=torch.float32),
                                torch.full((d,), self.density, device=cpu, dtype=torch.float32),
                                generator=g).long()
        counts.clamp_(min=1)  # every column gets at least one entry, so it can be normalized
        total = int(counts.sum())
        rows = torch.randint(0, D, (total,), generator=g, device=cpu)
        cols = torch.repeat_interleave(torch.arange(d, device=cpu), counts)
        vals = torch.randint(0, 2, (total,), generator=g, device=cpu).float() * 2 - 1
        coo = torch.sparse_coo_tensor(
            torch.stack([rows, cols]), vals, (D, d), check_invariants=True, device=cpu
        ).coalesce()
        rows, cols = coo.indices()
        vals = coo.values()
        keep = vals != 0  # a duplicate +1/-1 pair cancels
        rows, cols, vals = rows[keep], cols[keep], vals[keep]
        norms = torch.zeros(d, device=cpu, dtype=torch.float32).index_add_(0, cols, vals * vals).sqrt()
        if (norms == 0).any():
            raise ValueError("sparse projection generated an empty column; increase density or change the seed")
        vals = vals / norms[cols]
        idx_dtype = torch.int32 if D < 2**31 else torch.int64
        self.rows = rows.to(idx_dtype).to(self.device)
        self.cols = cols.to(torch.int32).to(self.device)
        self.vals = vals.to(self.device)


    @property
    def nnz(self) -> int:
        return int(self.vals.numel())

    def _matvec(self, c):
        out = torch.zeros(self.D, device=self.device, dtype=torch.float32)
        return out.index_add_(0, self.rows, c[self.cols] * self.vals)

    def _rmatvec(self, g):
        out = torch.zeros(self.d, device=self.device, dtype=torch.float32)
        return out.index_add_(0, self.cols, g[self.rows] * self.vals)

    def state_tensors(self):
        return {"rows": self.rows, "cols": self.cols, "vals": self.vals}

    def load_state_tensors(self, tensors):
        # the number of nonzeros is part of what was generated: accept the saved one as it is
        self.rows = tensors["rows"].to(self.device)
        self.cols = tensors["cols"].to(self.device)
        self.vals = tensors["vals"].to(self.device, torch.float32)
