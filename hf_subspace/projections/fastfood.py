"""Fastfood projection ``V = H G Π H B`` (Le, Sarlós & Smola 2013), format 2: stacked blocks, O(d) state, per slice.

As in format 1, θ is covered by ``⌈D/B⌉`` blocks of ``B = 2^⌈log2 d⌉`` rows (``block="global"`` gives Li et al.'s
single transform of length 2^⌈log2 D⌉). Block ``b`` maps ``c`` (zero-padded to ``B``) to rows ``[bB, (b+1)B)``::

    V_b c = H G_b Π H B_b c,    H: normalized Walsh–Hadamard, Π: a random permutation,
                                B_b = diag(roll(s, σ_b)),  G_b = diag(roll(g, τ_b))

with one random sign vector ``s`` and one Gaussian vector ``g`` of length ``B``, and per-block rotations
``σ_b, τ_b`` from a counter-based hash of ``(seed, b)``. So the state is ``O(B) = O(d)`` (format 1 drew ``B_b`` and
``G_b`` for every block: two floats per row of θ), and every block's ``‖G_b‖² = ‖g‖²`` exactly: the whole ``P`` is
scaled by ``1/√(‖g‖²/B · (full blocks + the kept fraction of the last))``, giving ``‖P e_i‖ ≈ 1`` over θ.

Products run on the blocks a slice of rows touches (``supports_row_slices``): a tensor's delta is computed on the
fly and its gradient taken at once, without a flat ``P c`` of size ``D``. Time ``O(D log d)`` per product.
"""
from __future__ import annotations

import math

import torch

from .base import Projection, cpu_generator
from .hadamard import fwht, hadamard_factors
from .hashing import block_hash


def block_layout(D: int, d: int, block: str) -> tuple[int, int]:
    """``(B, number of blocks)``: blocks of ``2^⌈log2 d⌉`` rows (``block="d"``) or one of ``2^⌈log2 D⌉``
    (``"global"``); the same in every format."""
    if block not in ("d", "global"):
        raise ValueError(f"fastfood block must be 'd' (blocks of size 2^ceil(log2 d)) or 'global', got {block!r}")
    B = 1 << max(0, math.ceil(math.log2(d if block == "d" else D)))
    return B, math.ceil(D / B)


class FastfoodProjection(Projection):
    kind = "fastfood"
    format = 2
    supports_row_slices = True

    def __init__(self, D, d, seed=0, device=None, block: str = "d"):
        super().__init__(D, d, seed, device)
        self.block = block
        self.B, self.n_blocks = block_layout(D, d, block)
        cpu = torch.device("cpu")  # explicit: a default-device context (meta, cuda) must not change P
        g = cpu_generator(self.seed, stream=6)
        self.signs = torch.randint(0, 2, (self.B,), generator=g, dtype=torch.int8, device=cpu).float().mul_(2).sub_(1)
        self.gauss = torch.randn(self.B, generator=g, device=cpu, dtype=torch.float32)
        self.perm = torch.randperm(self.B, generator=g, device=cpu)
        kept_last = (D - (self.n_blocks - 1) * self.B) / self.B
        sq = float(self.gauss.double().pow(2).sum()) / self.B * (self.n_blocks - 1 + kept_last)
        self.scale = sq ** -0.5
        self._saved: torch.Tensor | None = None  # per-block rotations of a saved P (save_projection=True)
        self.signs, self.gauss, self.perm = (t.to(self.device) for t in (self.signs, self.gauss, self.perm))
        self._build_derived()

    def _build_derived(self) -> None:
        self.inv_perm = torch.argsort(self.perm)
        # doubled, so that a rotation by r is the window [r, r + B): one gather of whole windows per block
        self._signs2 = torch.cat([self.signs, self.signs])
        self._gauss2 = torch.cat([self.gauss, self.gauss])
        # the Walsh–Hadamard factor matrices for length B: deterministic, held here and passed to fwht, so no
        # global cache is read or filled inside a (compiled) forward
        self.hadamard = hadamard_factors(self.B, self.device)

    def rotations(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(σ_b, τ_b)`` of block numbers ``blocks`` (int64, on the device): the rotations of ``s`` and ``g``."""
        if self._saved is not None:
            rot = self._saved[blocks.to(self._saved.device)].to(blocks.device)
            return rot[:, 0], rot[:, 1]
        return block_hash(blocks, self.seed, stream=7) % self.B, block_hash(blocks, self.seed, stream=8) % self.B

    def _diagonals(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``B_b`` and ``G_b`` of ``blocks`` as ``(n, B)`` matrices."""
        sigma, tau = self.rotations(blocks)
        return (torch.index_select(self._signs2.unfold(0, self.B, 1), 0, sigma),
                torch.index_select(self._gauss2.unfold(0, self.B, 1), 0, tau))

    def _forward_blocks(self, c: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``V_b c`` for ``blocks``: ``(n, B)``, scaled."""
        signs, gauss = self._diagonals(blocks)
        x = torch.zeros(self.B, device=self.device, dtype=torch.float32)
        x[: self.d] = c.detach().to(self.device, torch.float32)
        y = fwht(signs * x, self.hadamard)  # H B_b c
        y = y[:, self.perm] * gauss  # G_b Π
        return fwht(y, self.hadamard).mul_(self.scale)

    def _backward_blocks(self, y: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``Σ_b V_bᵀ y_b`` for ``y`` of shape ``(n, B)``: ``(d,)``."""
        signs, gauss = self._diagonals(blocks)
        y = fwht(y * self.scale, self.hadamard) * gauss
        y = fwht(y[:, self.inv_perm], self.hadamard) * signs
        return y.sum(0)[: self.d]

    def _block_ids(self, start: int, stop: int) -> tuple[torch.Tensor, int]:
        b0, b1 = start // self.B, (stop - 1) // self.B
        return torch.arange(b0, b1 + 1, device=self.device), b0 * self.B

    def matvec_rows(self, c, start, stop):
        if stop <= start:  # an empty slice (a zero-element tensor of θ)
            return torch.zeros(0, device=self.device, dtype=torch.float32)
        blocks, base = self._block_ids(start, stop)
        return self._forward_blocks(c, blocks).reshape(-1)[start - base: stop - base]

    def rmatvec_rows(self, g, start, stop):
        if stop <= start:
            return torch.zeros(self.d, device=self.device, dtype=torch.float32)
        blocks, base = self._block_ids(start, stop)
        y = torch.zeros(len(blocks) * self.B, device=self.device, dtype=torch.float32)
        y[start - base: stop - base] = g.detach().reshape(-1).to(self.device, torch.float32)
        return self._backward_blocks(y.view(len(blocks), self.B), blocks)

    def _entries(self, positions: torch.Tensor):
        flat = positions.reshape(-1).to(self.device, torch.int64)
        blocks, which = torch.unique(torch.div(flat, self.B, rounding_mode="floor"), return_inverse=True)
        return blocks, which, flat - blocks[which] * self.B

    def matvec_at(self, c, positions):
        if positions.numel() == 0:
            return torch.zeros(positions.shape, device=self.device, dtype=torch.float32)
        blocks, which, within = self._entries(positions)
        return self._forward_blocks(c, blocks)[which, within].view(positions.shape)

    def rmatvec_at(self, g, positions):
        if positions.numel() == 0:
            return torch.zeros(self.d, device=self.device, dtype=torch.float32)
        blocks, which, within = self._entries(positions)
        y = torch.zeros(len(blocks), self.B, device=self.device, dtype=torch.float32)
        y[which, within] = g.reshape(-1).to(self.device, torch.float32)  # positions are distinct
        return self._backward_blocks(y, blocks)

    def _matvec(self, c):
        return self.matvec_rows(c, 0, self.D)

    def _rmatvec(self, g):
        return self.rmatvec_rows(g, 0, self.D)

    def state_tensors(self):
        sigma, tau = self.rotations(torch.arange(self.n_blocks, device=self.device))
        return {"signs": self.signs, "gauss": self.gauss, "perm": self.perm,
                "rotations": torch.stack([sigma, tau], 1).to(torch.int32),
                "scale": torch.tensor([self.scale], dtype=torch.float64, device="cpu")}

    def load_state_tensors(self, tensors):
        tensors = dict(tensors)
        scale = tensors.pop("scale", None)
        rotations = tensors.pop("rotations")
        if rotations.shape != (self.n_blocks, 2):
            raise ValueError(f"saved fastfood projection has rotations of shape {tuple(rotations.shape)}, "
                             f"expected ({self.n_blocks}, 2)")
        super().load_state_tensors(tensors)
        if scale is not None:
            self.scale = float(scale.reshape(-1)[0])
        self._saved = rotations.to(torch.int64)
        self._build_derived()

    def _move(self, device):
        self.signs, self.gauss, self.perm = (t.to(device) for t in (self.signs, self.gauss, self.perm))
        self._build_derived()

    def state_bytes(self) -> int:
        """Bytes held beside the model: ``s``, ``g``, ``Π`` and its inverse, their doubled copies, the factors."""
        held = [self.signs, self.gauss, self.perm, self.inv_perm, self._signs2, self._gauss2,
                *{id(h): h for h in self.hadamard}.values()]
        return sum(t.numel() * t.element_size() for t in held)
