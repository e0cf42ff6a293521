"""Count-sketch (hashing) projection, format 1 (hf_subspace 0.1.0): exactly one nonzero per row.

Kept so that adapters saved in this format load bit-exactly; new adapters use format 2
(:mod:`hf_subspace.projections.hashing`), whose state is O(d) instead of one integer per row.


Row ``i`` of ``P`` is ``s_i / √n_h(i)`` in column ``h(i)``: ``h`` spreads the ``D`` rows evenly over the ``d``
columns (each column gets ``⌊D/d⌋`` or ``⌈D/d⌉`` rows, shuffled), ``s_i = ±1``. Columns are then exactly
orthonormal (``PᵀP = I``), so ``c`` and θ - θ0 have the same length.

Cost is the floor of any projection: the sign is folded into the index (row ``i`` reads entry
``h(i) + d·[s_i < 0]`` of ``[c/√n, -c/√n]``), so ``P c`` is one gather and ``Pᵀ g`` one scatter-add into ``2d``
bins — no other pass over ``D``. Memory: one int32 per row (and a transient ``randperm(D)`` while building).
"""
from __future__ import annotations

import torch

from .base import Projection, cpu_generator


class HashingProjectionV1(Projection):
    kind = "hashing"
    format = 1

    def __init__(self, D, d, seed=0, device=None):
        super().__init__(D, d, seed, device)
        # generated on the CPU (CPU random streams are the same on every machine), then moved to the device
        g = cpu_generator(self.seed, stream=2)
        index_dtype = torch.int32 if D < 2**31 and 2 * d < 2**31 else torch.int64
        # a random permutation taken mod d assigns every column ⌊D/d⌋ or ⌈D/d⌉ rows, shuffled; built in place
        # in the final dtype so the transient memory stays ~2 ints per row
        idx = torch.randperm(D, generator=g, dtype=index_dtype, device="cpu").remainder_(d)
        counts = torch.bincount(idx, minlength=d).float()
        negative = torch.randint(0, 2, (D,), generator=g, dtype=torch.int8, device="cpu")
        idx.add_(negative.to(index_dtype).mul_(d))
        del negative
        self.index = idx.to(self.device)
        self.col_scale = counts.rsqrt().to(self.device)

    supports_row_slices = True
    entries_sync_free = True  # matvec_at / rmatvec_at: a gather and an index_add (repeated positions accumulate)

    # every product is one gather (P c) or one scatter-add (Pᵀ g) over some of the rows' indices
    def _gather(self, c, index):
        cs = c.detach().to(self.device, torch.float32) * self.col_scale
        return torch.index_select(torch.cat([cs, -cs]), 0, index)

    def _scatter(self, g, index):
        g = g.detach().reshape(-1).to(self.device, torch.float32)
        bins = torch.zeros(2 * self.d, device=self.device, dtype=torch.float32).index_add_(0, index, g)
        return (bins[: self.d] - bins[self.d:]) * self.col_scale

    def matvec_rows(self, c, start, stop):
        return self._gather(c, self.index[start:stop])

    def rmatvec_rows(self, g, start, stop):
        return self._scatter(g, self.index[start:stop])

    def matvec_at(self, c, positions):
        return self._gather(c, self.index[positions.reshape(-1)]).view(positions.shape)

    def rmatvec_at(self, g, positions):
        return self._scatter(g, self.index[positions.reshape(-1)])

    def _matvec(self, c):
        return self._gather(c, self.index)

    def _rmatvec(self, g):
        return self._scatter(g, self.index)

    def state_tensors(self):
        return {"index": self.index, "col_scale": self.col_scale}
