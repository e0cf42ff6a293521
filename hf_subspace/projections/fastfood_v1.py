"""Fastfood projection, format 1 (hf_subspace 0.1.0): ``V = H G Π H B`` (Le, Sarlós & Smola 2013), stacked in blocks.

Kept so that adapters saved in this format load bit-exactly; new adapters use format 2
(:mod:`hf_subspace.projections.fastfood`), whose state is O(d) and whose products run per slice of rows.

Li et al. 2018 use one Fastfood transform over all of θ, padded to the next power of two ≥ D:
``O(D log D)`` time and four transforms of length 2^⌈log2 D⌉ per step. Here, as Le et al. do to get more
features, θ is covered by ``⌈D/B⌉`` independent blocks of size ``B = 2^⌈log2 d⌉`` (``block="global"``
gives the single transform). Block ``b`` maps ``c`` (zero-padded to ``B``) to rows ``[bB, (b+1)B)``::

    V_b c = H G_b Π H B_b c,    H: normalized Walsh–Hadamard, G_b: Gaussian diagonal,
                                Π: a shared random permutation, B_b: random ±1 diagonal

and rows past ``D`` are dropped. Time ``O(D log d)``, memory ``O(D)`` (two floats per row). With orthonormal
``H`` every column of block ``b`` has squared length ``‖G_b‖²/B``, so the whole ``P`` is scaled by
``1/√(Σ_b ‖G_b‖²/B)`` (the partial last block counted by the fraction of its rows kept), giving ``‖P e_i‖ ≈ 1``
over all of θ — not ``√(number of blocks)``.
"""
from __future__ import annotations


import torch

from .base import Projection, cpu_generator
from .fastfood import block_layout
from .hadamard import fwht, hadamard_factors


class FastfoodProjectionV1(Projection):
    kind = "fastfood"
    format = 1

    def __init__(self, D, d, seed=0, device=None, block: str = "d"):
        super().__init__(D, d, seed, device)
        self.block = block
        self.B, self.n_blocks = block_layout(D, d, block)
        # generated on the CPU (CPU random streams are the same on every machine), then moved to the device
        g = cpu_generator(self.seed, stream=3)
        shape = (self.n_blocks, self.B)
        cpu = torch.device("cpu")
        self.signs = torch.randint(0, 2, shape, generator=g, dtype=torch.int8, device=cpu).float().mul_(2).sub_(1)
        self.gauss = torch.randn(shape, generator=g, device=cpu, dtype=torch.float32)
        self.perm = torch.randperm(self.B, generator=g, device=cpu)
        sq = self.gauss.double().pow(2).sum(1) / self.B
        kept_last = D - (self.n_blocks - 1) * self.B
        sq[-1] *= kept_last / self.B
        self.scale = float(sq.sum().rsqrt())
        self.inv_perm = torch.argsort(self.perm)
        self.signs, self.gauss, self.perm, self.inv_perm = (
            t.to(self.device) for t in (self.signs, self.gauss, self.perm, self.inv_perm)
        )
        # the Walsh–Hadamard factor matrices for length B: deterministic (not state_tensors), held here on
        # self.device and passed to fwht, so no global cache is read or filled inside a (compiled) forward
        self.hadamard = hadamard_factors(self.B, self.device)


    def _matvec(self, c):
        x = torch.zeros(self.B, device=self.device, dtype=torch.float32)
        x[: self.d] = c
        y = fwht(self.signs * x, self.hadamard)  # (n_blocks, B): H B_b c
        y = y[:, self.perm] * self.gauss  # G_b Π
        y = fwht(y, self.hadamard)
        return y.reshape(-1)[: self.D] * self.scale

    def _rmatvec(self, g):
        y = torch.zeros(self.n_blocks * self.B, device=self.device, dtype=torch.float32)
        y[: self.D] = g * self.scale
        y = fwht(y.view(self.n_blocks, self.B), self.hadamard) * self.gauss
        y = fwht(y[:, self.inv_perm], self.hadamard) * self.signs
        return y.sum(0)[: self.d]

    def state_tensors(self):
        return {"signs": self.signs, "gauss": self.gauss, "perm": self.perm,
                "scale": torch.tensor([self.scale], dtype=torch.float64, device="cpu")}

    def load_state_tensors(self, tensors):
        tensors = dict(tensors)
        scale = tensors.pop("scale", None)
        super().load_state_tensors(tensors)
        if scale is not None:
            self.scale = float(scale.reshape(-1)[0])
        self.inv_perm = torch.argsort(self.perm)

    def _move(self, device):
        self.signs, self.gauss, self.perm, self.inv_perm = (
            t.to(device) for t in (self.signs, self.gauss, self.perm, self.inv_perm)
        )
        moved: dict[int, torch.Tensor] = {}  # factors of equal size share one tensor; keep it that way
        for h in self.hadamard:
            if id(h) not in moved:
                moved[id(h)] = h.to(device)
        self.hadamard = tuple(moved[id(h)] for h in self.hadamard)
