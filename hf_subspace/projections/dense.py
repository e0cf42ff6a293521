"""Dense Gaussian projection, generated and applied in row chunks.

``P[i, j] = z_ij / ‖z_:j‖`` with ``z_ij ~ N(0, 1)``. The matrix is never held whole: rows are generated in
chunks of at most ``CHUNK_ELEMENTS`` entries from a per-chunk seed, used and dropped, so memory stays
bounded whatever ``D`` is. Time is ``O(D·d)`` per product (regeneration included), which is why dense is for
small models and for checking the structured kinds against.

Chunks are generated on ``rng_device`` (the device P was first built on; CPU and CUDA random streams
differ), then moved to the compute device, so the same ``P`` comes back on any machine.
"""
from __future__ import annotations

import torch

from .base import Projection

CHUNK_ELEMENTS = 1 << 22  # 4M floats = 16 MiB per generated block; fixed, it defines the chunk seeds


class DenseProjection(Projection):
    kind = "dense"

    def __init__(self, D, d, seed=0, device=None, rng_device: str | None = None):
        super().__init__(D, d, seed, device)
        self.rng_device = torch.device(rng_device) if rng_device is not None else self.device
        if self.rng_device.type == "cuda" and not torch.cuda.is_available():
            # P was built on a GPU; its CUDA random stream cannot be reproduced here
            raise ValueError(
                "this dense projection was generated with the CUDA random stream, and CUDA is not available; "
                "save the adapter with save_projection=True to move it across device types"
            )
        self.chunk_rows = max(1, CHUNK_ELEMENTS // d)
        self._inv_norms: torch.Tensor | None = None
        self._saved: torch.Tensor | None = None  # set only when a saved P is loaded

    def describe(self):
        return {**super().describe(), "rng_device": self.rng_device.type}

    def _chunks(self):
        for k, start in enumerate(range(0, self.D, self.chunk_rows)):
            yield k, start, min(start + self.chunk_rows, self.D)

    def _raw_chunk(self, k: int, start: int, stop: int) -> torch.Tensor:
        if self._saved is not None:
            return self._saved[start:stop].to(self.device)
        g = torch.Generator(device=self.rng_device)
        g.manual_seed((self.seed * 1_000_003 + k * 7_919 + 99_991) % (2**63 - 1))
        z = torch.randn(stop - start, self.d, generator=g, device=self.rng_device, dtype=torch.float32)
        return z.to(self.device)

    def inv_norms(self) -> torch.Tensor:
        if self._inv_norms is None:
            sq = torch.zeros(self.d, dtype=torch.float64, device=self.device)
            for k, a, b in self._chunks():
                sq += self._raw_chunk(k, a, b).double().pow(2).sum(0)
            self._inv_norms = sq.rsqrt().float()
        return self._inv_norms

    def _matvec(self, c):
        cs = c * self.inv_norms()
        out = torch.empty(self.D, device=self.device, dtype=torch.float32)
        for k, a, b in self._chunks():
            out[a:b] = self._raw_chunk(k, a, b) @ cs
        return out

    def _rmatvec(self, g):
        acc = torch.zeros(self.d, device=self.device, dtype=torch.float32)
        for k, a, b in self._chunks():
            acc += self._raw_chunk(k, a, b).T @ g[a:b]
        return acc * self.inv_norms()

    def _move(self, device):
        if self._inv_norms is not None:
            self._inv_norms = self._inv_norms.to(device)

    def state_tensors(self):
        if self.D * self.d > 200_000_000:
            raise ValueError(
                f"saving a dense {self.D}x{self.d} projection would take {self.D * self.d * 4 / 2**30:.1f} GiB; "
                "it is regenerated from its seed instead"
            )
        full = torch.cat([self._raw_chunk(k, a, b) for k, a, b in self._chunks()]) * self.inv_norms()
        return {"matrix": full}

    def load_state_tensors(self, tensors):
        m = tensors["matrix"]
        if m.shape != (self.D, self.d):
            raise ValueError(f"saved dense projection has shape {tuple(m.shape)}, expected {(self.D, self.d)}")
        self._saved = m.to(self.device, torch.float32)
        self._inv_norms = torch.ones(self.d, device=self.device)
