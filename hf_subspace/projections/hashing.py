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
``r_b`` and ``u_b`` — one gather of whole windows — times ``v``; ``Pᵀ g`` multiplies by ``v``, rolls each whole
block's row by ``r_b`` onto the columns (a window of the row written twice: a gather indexed by block, never an
index of one int64 per row) and sums the rows with their signs ``u_b``, a chunk of blocks at a time. The first
and last (partial) block of a slice are plain slices at offsets hashed on the host (:meth:`window_start`), so
no product reads a value back from the device. State:
``v``, ``1/√n`` and ``arange(d)`` — ``O(d)``, e.g. 160 KB at d = 10k whatever ``D`` is; nothing of size ``D``
is built, not even while constructing ``P``. Format 1 (one int32 per row, hf_subspace 0.1.0) is in
:mod:`hf_subspace.projections.hashing_v1`.
"""
from __future__ import annotations

from array import array

import torch

from .base import Projection, cpu_generator

_P31 = 2**31 - 1  # a Mersenne prime: products of two residues stay below 2**62, so int64 never overflows
_MULTS = (1_103_515_245, 2_147_482_951, 1_664_525_397)
#: rows per index chunk of the backward: 1M rows = 8 MiB of int64 index
CHUNK_ROWS = 1 << 20


def _roll_rows(rows: torch.Tensor, shifts: torch.Tensor, sign: torch.Tensor, d: int) -> torch.Tensor:
    """``Σ_b sign_b · roll(rows_b, shifts_b)`` (``(n, d)`` -> ``(d,)``): row ``b`` entry ``k`` lands on column
    ``(k + shifts_b) mod d``. Each rolled row is the window ``[d - shifts_b, 2d - shifts_b)`` of the row written
    twice: one gather indexed by ``n`` block numbers, not by ``n·d`` positions."""
    n = rows.shape[0]
    twice = torch.cat([rows, rows], 1)
    rolled = twice.unfold(1, d, 1)[torch.arange(n, device=rows.device), d - shifts]
    return (rolled * sign.unsqueeze(1)).sum(0)


def block_hash_int(block: int, seed: int, stream: int) -> int:
    """:func:`block_hash` of one block number, in Python integers on the host (the same value, no device read)."""
    x = (int(block) + (int(seed) * 7_919 + int(stream) * 104_729 + 12_345) % _P31) % _P31
    for m in _MULTS:
        x = (x * m + 40_503) % _P31
        x = x ^ (x >> 13)
    return x


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
        self._saved_host = None  # a saved P's block offsets as host integers (array('q'))
        self._ranges: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
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

    def _block_range(self, b0: int, b1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r_b, r_b + 2d·[u_b < 0])`` for blocks ``b0..b1`` (int64 on the device): the column offset, and where
        the block's window starts in ``[w, w, -w, -w]``. Hashed on the device (no host read).

        Kept per range asked (one per tensor of θ: ``O(D/d)`` numbers in all, 16 B per block, e.g. 200 KB at
        D = 124M, d = 10k), so a training step does not hash the same blocks again and again.
        """
        key = (b0, b1)
        hit = self._ranges.get(key)
        if hit is None:
            r, neg = self.shifts_signs(torch.arange(b0, b1 + 1, device=self.device))
            hit = (r, r + neg * (2 * self.d))
            if not torch.compiler.is_compiling():
                self._ranges[key] = hit
        return hit

    def window_start(self, b: int) -> int:
        """Where block ``b``'s window starts in ``[w, w, -w, -w]`` (``r_b + 2d·[u_b < 0]``), as a host integer:
        the first and last block of a slice are plain slices at this offset, with no read from the device."""
        if self._saved_host is not None:
            shifts, negative = self._saved_host
            return shifts[b] + (2 * self.d if negative[b] else 0)
        return block_hash_int(b, self.seed, 5) % self.d + (2 * self.d if block_hash_int(b, self.seed, 6) & 1 else 0)

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
        """``[w, w, -w, -w]`` (``w = c/√n``): block ``b`` reads window ``r_b`` (``u_b = 1``) or ``2d + r_b``."""
        w = c.detach().to(self.device, torch.float32) * self.col_scale
        return torch.cat([w, w, -w, -w])

    def matvec_rows(self, c, start, stop):
        if stop <= start:  # an empty slice (a zero-element tensor of θ)
            return torch.zeros(0, device=self.device, dtype=torch.float32)
        d = self.d
        z = self._windows(c)
        out = torch.empty(stop - start, device=self.device, dtype=torch.float32)
        b0, b1 = start // d, (stop - 1) // d  # first and last block touched
        for b in (b0, b1)[: 1 if b1 == b0 else 2]:  # first and last block: plain slices at host offsets
            lo, hi = max(start, b * d) - b * d, min(stop, (b + 1) * d) - b * d
            o = self.window_start(b)
            at = b * d + lo - start
            torch.mul(z[o + lo: o + hi], self.v[lo:hi], out=out[at: at + hi - lo])
        if b1 - b0 >= 2:  # whole blocks in between: one gather of windows at offsets kept on the device
            _, offsets = self._block_range(b0 + 1, b1 - 1)
            mid = out[(b0 + 1) * d - start: b1 * d - start].view(b1 - b0 - 1, d)
            torch.index_select(z.unfold(0, d, 1), 0, offsets, out=mid)
            mid.mul_(self.v)
        return out

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
    def _block_signs(self, b0: int, b1: int) -> torch.Tensor:
        """``u_b`` (±1.0, float32 on the device) of blocks ``b0..b1``."""
        _, offsets = self._block_range(b0, b1)
        return 1.0 - 2.0 * (offsets >= 2 * self.d).to(torch.float32)

    def _fold(self, bins):
        """``4d`` bins (row offsets ``r_b + k``, plus ``2d`` where ``u_b = -1``) back onto the ``d`` columns, scaled."""
        d = self.d
        return ((bins[:d] + bins[d: 2 * d]) - (bins[2 * d: 3 * d] + bins[3 * d:])) * self.col_scale

    def rmatvec_rows(self, g, start, stop):
        if stop <= start:
            return torch.zeros(self.d, device=self.device, dtype=torch.float32)
        d = self.d
        g = g.detach().reshape(-1).to(self.device, torch.float32)
        bins = torch.zeros(4 * d, device=self.device, dtype=torch.float32)
        b0, b1 = start // d, (stop - 1) // d
        for b in (b0, b1)[: 1 if b1 == b0 else 2]:  # first and last block: slice adds at host offsets
            lo, hi = max(start, b * d) - b * d, min(stop, (b + 1) * d) - b * d
            o, at = self.window_start(b), b * d + lo - start
            bins[o + lo: o + hi].addcmul_(g[at: at + hi - lo], self.v[lo:hi])
        out = self._fold(bins)
        if b1 - b0 >= 2:  # whole blocks in between: each block's row rolled onto the columns, summed with its sign
            r, _ = self._block_range(b0 + 1, b1 - 1)
            sign = self._block_signs(b0 + 1, b1 - 1)
            mid = g[(b0 + 1) * d - start: b1 * d - start].view(b1 - b0 - 1, d)
            step = max(1, CHUNK_ROWS // d)
            total = None
            for c0 in range(0, len(mid), step):  # a chunk at a time: ~3 chunk-sized float32 temporaries
                part = _roll_rows(mid[c0: c0 + step] * self.v, r[c0: c0 + step], sign[c0: c0 + step], d)
                total = part if total is None else total + part
            out = out + total * self.col_scale
        return out

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
        self._saved_host = (array("q", shifts.to(torch.int64).tolist()), array("b", negative.to(torch.int8).tolist()))
        self._ranges = {}

    def _move(self, device):
        self.v, self.col_scale, self.positions = (t.to(device) for t in (self.v, self.col_scale, self.positions))
        self._ranges = {}

    def state_bytes(self) -> int:
        """Bytes held beside the model for this projection: ``v``, ``1/√n``, ``arange(d)`` and the block ranges
        kept so far (at most 16 B per block of d rows)."""
        held = [self.v, self.col_scale, self.positions] + [t for hit in self._ranges.values() for t in hit]
        return sum(t.numel() * t.element_size() for t in held)
