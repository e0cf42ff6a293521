"""Count-sketch (hashing) projection, format 2: one nonzero per row, O(d) state, regenerated per slice.

The rows of θ are cut into blocks of ``d`` consecutive rows (block ``b`` = rows ``[b·d, (b+1)·d)``, the last one
partial). Row ``i = b·d + k`` of ``P`` has a single nonzero::

    P[i, (k + r_b) mod d] = u_b · v_k / √n_col

``r_b ∈ [0, d)`` and ``u_b = ±1`` come from a counter-based hash of ``(seed, b)``, computed when a slice is
used; ``v ∈ {±1}^d`` is drawn once from the seed. Every full block meets every column exactly once, so each
column holds ``⌊D/d⌋`` or ``⌈D/d⌉`` rows (the partial block adds one to the columns it covers), counted
analytically; with ``n_col`` that count the columns are exactly orthonormal (``PᵀP = I``). Within a column the
rows sit at an independent random offset in each block, with independent signs.

Cost: ``P c`` over a slice is, per block, a contiguous window of ``[w, w, -w, -w]`` (``w = c/√n``) chosen by
``r_b`` and ``u_b`` — one gather of whole windows for every block a slice touches (its partial first and last
blocks whole, then the slice taken) — times ``v``; ``Pᵀ g`` pads the slice to whole blocks, multiplies by ``v``,
rolls each block's row by ``r_b`` onto the columns (a window of the row written twice: a gather indexed by
block, never an index of one int64 per row) and sums the rows with their signs ``u_b``, a chunk of blocks at a
time. Block offsets are hashed on the device and kept per slice: no product reads a value back to the host,
and a product is a fixed handful of ops whatever the slice. State:
``v``, ``1/√n`` and ``arange(d)`` — ``O(d)``, e.g. 160 KB at d = 10k whatever ``D`` is; nothing of size ``D``
is built, not even while constructing ``P``. Format 1 (one int32 per row, hf_subspace 0.1.0) is in
:mod:`hf_subspace.projections.hashing_v1`.
"""
from __future__ import annotations

import weakref

import torch

from ..cache import values_token
from .base import Projection, cpu_generator

_P31 = 2**31 - 1  # a Mersenne prime: products of two residues stay below 2**62, so int64 never overflows
_MULTS = (1_103_515_245, 2_147_482_951, 1_664_525_397)
#: rows per index chunk of the backward: 1M rows = 8 MiB of int64 index
CHUNK_ROWS = 1 << 20


def _roll_rows(rows: torch.Tensor, roll_start: torch.Tensor, sign: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``Σ_b sign_b · roll(rows_b, r_b)`` (``(n, d)`` -> ``(d,)``): row ``b``'s entry ``k`` lands on column
    ``(k + r_b) mod d``. Each rolled row is the window ``[d - r_b, 2d - r_b)`` (``roll_start``) of the row written
    twice: one gather indexed by ``n`` block numbers (``index = arange(n)``), never by ``n·d`` positions."""
    d = rows.shape[1]
    rolled = torch.cat([rows, rows], 1).unfold(1, d, 1)[index, roll_start]
    return (rolled * sign).sum(0)


def block_hash(blocks: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """A deterministic pseudo-random residue in ``[0, 2^31 - 1)`` for each block number (int64 in, int64 out).

    Three rounds of a multiply-add mod a Mersenne prime with xor-shift mixing: integer arithmetic only, the same
    on every device and process.
    """
    offset = (int(seed) * 7_919 + int(stream) * 104_729 + 12_345) % _P31  # Python ints: any seed fits
    x = (blocks.to(torch.int64) + offset) % _P31
    for m in _MULTS:
        x = (x * m + 40_503) % _P31
        x = x ^ (x >> 13)
    return x


class HashingProjection(Projection):
    kind = "hashing"
    format = 2

    def __init__(self, D, d, seed=0, device=None):
        super().__init__(D, d, seed, device)
        self._saved: tuple[torch.Tensor, torch.Tensor] | None = None
        self._z = None  # (weakref to c, its token, [w, w, -w, -w]) of the last c multiplied
        self._ranges: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        g = cpu_generator(self.seed, stream=4)
        cpu = torch.device("cpu")  # explicit: a default-device context (meta, cuda) must not change P
        self.v = torch.randint(0, 2, (d,), generator=g, dtype=torch.int8, device=cpu).float().mul_(2).sub_(1)
        self.n_blocks = -(-D // d)
        counts = torch.full((d,), float(D // d), device=cpu, dtype=torch.float32)  # whatever the default dtype
        partial = D - (D // d) * d
        if partial:  # the last block covers columns (k + r_last) mod d for k < partial
            r_last = int(self.shifts_signs(torch.tensor([self.n_blocks - 1], device=cpu))[0][0])
            counts[(torch.arange(partial, device=cpu) + r_last) % d] += 1
        self.col_scale = counts.rsqrt()
        self.positions = torch.arange(d, device=cpu)
        self.v, self.col_scale, self.positions = (t.to(self.device) for t in (self.v, self.col_scale, self.positions))

    supports_row_slices = True

    def _block_range(self, b0: int, b1: int) -> tuple[torch.Tensor, ...]:
        """For blocks ``b0..b1`` (on the device, int64 unless said): ``r_b + 2d·[u_b < 0]``, where the block's
        window starts in ``[w, w, -w, -w]``; ``u_b`` as a float32 column ``(n, 1)``; ``d - r_b``, where
        the block's rolled row starts in the row written twice (Pᵀg); and ``arange(n)``. Hashed on the device,
        no host read.

        Kept per range asked (one per tensor of θ: ``O(D/d)`` numbers in all, 28 B per block, e.g. 350 KB at
        D = 124M, d = 10k), so a training step does not hash the same blocks again and again.
        """
        key = (b0, b1)
        hit = self._ranges.get(key)
        if hit is None:
            r, neg = self.shifts_signs(torch.arange(b0, b1 + 1, device=self.device))
            sign = (1.0 - 2.0 * neg.to(torch.float32)).unsqueeze(1)
            hit = (r + neg * (2 * self.d), sign, self.d - r, torch.arange(b1 - b0 + 1, device=self.device))
            if not torch.compiler.is_compiling():
                self._ranges[key] = hit
        return hit

    def shifts_signs(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_b, u_b < 0)`` for block numbers ``blocks``: the column offset and whether the block's sign is -1."""
        if self._saved is not None:  # a saved P (save_projection=True) replays its own block offsets
            shifts, negative = self._saved
            return shifts[blocks.to(shifts.device)].to(blocks.device, torch.int64), negative[blocks.to(
                negative.device)].to(blocks.device) != 0
        # the sign from a stream of its own: a bit of the offset's hash would tie u_b to r_b when 2^k divides d
        return block_hash(blocks, self.seed, stream=5) % self.d, block_hash(blocks, self.seed, stream=6) & 1 == 1

    # -- P c ------------------------------------------------------------------------------------------------
    def _windows(self, c):
        """``[w, w, -w, -w]`` (``w = c/√n``): block ``b`` reads window ``r_b`` (``u_b = 1``) or ``2d + r_b``.

        Kept for the same ``c`` object while it is unchanged (host-side check: :mod:`hf_subspace.cache`), so the
        tensors of one forward (and their recomputes) share it: ``4d`` floats.
        """
        key = values_token([c])
        hit = self._z
        if hit is not None and hit[0]() is c and hit[1] == key:
            return hit[2]
        w = c.detach().to(self.device, torch.float32) * self.col_scale
        z = torch.cat([w, w, -w, -w])
        if not torch.compiler.is_compiling():
            self._z = (weakref.ref(c), key, z)
        return z

    def matvec_rows(self, c, start, stop):
        if stop <= start:  # an empty slice (a zero-element tensor of θ)
            return torch.zeros(0, device=self.device, dtype=torch.float32)
        d = self.d
        b0, b1 = start // d, (stop - 1) // d  # first and last block touched
        offsets = self._block_range(b0, b1)[0]
        # every block touched, the partial first and last ones whole: one gather of windows, then the slice
        blocks = torch.index_select(self._windows(c).unfold(0, d, 1), 0, offsets).mul_(self.v)
        return blocks.view(-1)[start - b0 * d: stop - b0 * d]

    def matvec_at(self, c, positions):
        flat = positions.reshape(-1).to(self.device, torch.int64)
        b = torch.div(flat, self.d, rounding_mode="floor")
        k = flat - b * self.d
        r, neg = self.shifts_signs(b)
        z = self._windows(c)
        return (z[k + r + neg * (2 * self.d)] * self.v[k]).view(positions.shape)

    def _matvec(self, c):
        return self.matvec_rows(c, 0, self.D)

    entries_sync_free = True  # matvec_at / rmatvec_at: elementwise hashes and an index_add (repeats accumulate)

    # -- Pᵀ g -----------------------------------------------------------------------------------------------
    def _fold(self, bins):
        """``4d`` bins (row offsets ``r_b + k``, plus ``2d`` where ``u_b = -1``) back onto the ``d`` columns, scaled."""
        d = self.d
        return ((bins[:d] + bins[d: 2 * d]) - (bins[2 * d: 3 * d] + bins[3 * d:])) * self.col_scale

    def rmatvec_rows(self, g, start, stop):
        if stop <= start:
            return torch.zeros(self.d, device=self.device, dtype=torch.float32)
        d = self.d
        b0, b1 = start // d, (stop - 1) // d
        _, sign, roll_start, rows = self._block_range(b0, b1)
        g = g.detach().reshape(-1).to(self.device, torch.float32)
        if start != b0 * d or stop != (b1 + 1) * d:  # partial first or last block: zeros around the slice
            padded = torch.zeros((b1 - b0 + 1) * d, device=self.device, dtype=torch.float32)
            padded[start - b0 * d: stop - b0 * d] = g
            g = padded
        blocks = g.view(b1 - b0 + 1, d)
        step = max(1, CHUNK_ROWS // d)
        total = None
        if len(blocks) <= step:
            total = _roll_rows(blocks * self.v, roll_start, sign, rows)
        for c0 in range(0, len(blocks), step) if len(blocks) > step else ():  # a chunk at a time: ~3 chunk-sized
            c1 = c0 + step                                                     # float32 temporaries
            part = _roll_rows(blocks[c0: c1] * self.v, roll_start[c0: c1], sign[c0: c1], rows[: len(blocks[c0: c1])])
            total = part if c0 == 0 else total + part
        return total * self.col_scale

    def rmatvec_at(self, g, positions):
        flat = positions.reshape(-1).to(self.device, torch.int64)
        b = torch.div(flat, self.d, rounding_mode="floor")
        k = flat - b * self.d
        r, neg = self.shifts_signs(b)
        val = g.reshape(-1).to(self.device, torch.float32) * self.v[k]
        bins = torch.zeros(4 * self.d, device=self.device, dtype=torch.float32)
        return self._fold(bins.index_add_(0, k + r + neg * (2 * self.d), val))

    def _rmatvec(self, g):
        return self.rmatvec_rows(g, 0, self.D)

    def state_tensors(self):
        """``v``, ``1/√n`` and every block's offset and sign (``O(D/d)``: only built when a P is saved)."""
        r, neg = self.shifts_signs(torch.arange(self.n_blocks, device=self.device))
        return {"v": self.v, "col_scale": self.col_scale, "shifts": r.to(torch.int32),
                "negative": neg.to(torch.int8)}

    def load_state_tensors(self, tensors):
        tensors = dict(tensors)
        shifts, negative = tensors.pop("shifts"), tensors.pop("negative")
        if shifts.shape != (self.n_blocks,) or negative.shape != (self.n_blocks,):
            raise ValueError(f"saved hashing projection has {tuple(shifts.shape)} block offsets, expected "
                             f"({self.n_blocks},)")
        super().load_state_tensors(tensors)
        self._saved = (shifts.to(torch.int64), negative.to(torch.int8))
        self._ranges, self._z = {}, None

    def _move(self, device):
        self.v, self.col_scale, self.positions = (t.to(device) for t in (self.v, self.col_scale, self.positions))
        self._ranges, self._z = {}, None

    def state_bytes(self) -> int:
        """Bytes held beside the model for this projection: ``v``, ``1/√n``, ``arange(d)`` and the block ranges
        kept so far (at most 28 B per block of d rows)."""
        held = [self.v, self.col_scale, self.positions] + [t for hit in self._ranges.values() for t in hit]  # noqa
        return sum(t.numel() * t.element_size() for t in held)
