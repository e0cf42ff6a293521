"""Walsh–Hadamard transform done as a few small dense matrix products.

``H_n = H_a ⊗ H_b ⊗ ...`` for ``n = a·b·...`` (all powers of two), so a batch of length-``n`` vectors viewed
as a tensor of shape ``(batch, a, b, ...)`` is transformed by one small matmul per axis. That is
``O(n · Σ a_j)`` flops in a handful of BLAS calls instead of ``log2 n`` memory-bound butterfly passes, it runs
wherever torch runs (CPU, CUDA), and it is differentiable. Normalized: ``H Hᵀ = I`` and ``H = Hᵀ``.

There is no module-level state: the small factor matrices are built by :func:`hadamard_factors` and passed to
:func:`fwht` by their owner (a :class:`~hf_subspace.projections.FastfoodProjection` builds them once, on its
device, and moves them with itself). Nothing global is read or filled while a forward pass runs, so the
transform traces cleanly under ``torch.compile`` in a fresh process.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

_MAX_FACTOR_BITS = 7  # factors of at most 128x128


def _hadamard_cpu(bits: int) -> torch.Tensor:
    """The normalized ``2^bits x 2^bits`` Hadamard matrix (Sylvester order), built in float64 on the CPU and
    returned as a new float32 tensor (no cache: nothing shared to be mutated)."""
    h = torch.ones(1, 1, dtype=torch.float64, device="cpu")
    for _ in range(bits):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(h.shape[0])).to(torch.float32)


def hadamard_matrix(bits: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized ``2^bits x 2^bits`` Hadamard matrix (Sylvester order) on ``device``; a new tensor each call."""
    return _hadamard_cpu(bits).to(device=device, dtype=dtype)


def factor_bits(bits: int) -> list[int]:
    """Split ``bits`` into near-equal factors of at most ``_MAX_FACTOR_BITS``."""
    if bits == 0:
        return []
    n_factors = math.ceil(bits / _MAX_FACTOR_BITS)
    base, extra = divmod(bits, n_factors)
    return [base + (1 if i < extra else 0) for i in range(n_factors)]


def _length_bits(n: int) -> int:
    bits = n.bit_length() - 1
    if n <= 0 or (1 << bits) != n:
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    return bits


def hadamard_factors(n: int, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """The factor matrices :func:`fwht` uses for length ``n`` (a power of two), in order, on ``device``.

    One matrix per entry of ``factor_bits(log2 n)``; factors of equal size share one tensor. Empty for ``n = 1``.
    """
    built: dict[int, torch.Tensor] = {}
    out = []
    for fb in factor_bits(_length_bits(n)):
        if fb not in built:
            built[fb] = hadamard_matrix(fb, device, dtype)
        out.append(built[fb])
    return tuple(out)


def fwht(x: torch.Tensor, factors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Normalized Walsh–Hadamard transform along the last dimension (a power of two).

    ``x``: ``(..., n)`` -> ``(..., n)``. Orthonormal and symmetric, so it is its own inverse and adjoint.

    ``factors``: the matrices from :func:`hadamard_factors` for this ``n``, on ``x``'s device and in its dtype.
    Callers on a hot path (and anything under ``torch.compile``) pass them; without them they are built for
    this call (fine for tests and one-off use).

    With ``n = a_1·…·a_m`` and ``x`` viewed as ``(batch, a_1, …, a_m)``, factor ``j`` is applied as a batched matmul
    ``H_{a_j} @ y`` on the view ``(batch·a_1…a_{j-1}, a_j, rest)``, and the last one (``rest = 1``) as one large
    GEMM ``y @ H``: no copies between factors. Measured on 2 CPU cores at D = 22.7M: 0.14–0.23 s per transform,
    1.8x faster than rotating axes between GEMMs.
    """
    n = x.shape[-1]
    bits = _length_bits(n)
    sizes = [1 << fb for fb in factor_bits(bits)]
    if factors is None:
        factors = hadamard_factors(n, x.device, x.dtype)
    elif [tuple(h.shape) for h in factors] != [(a, a) for a in sizes]:
        raise ValueError(
            f"fwht of length {n} needs Hadamard factors of shapes {[(a, a) for a in sizes]}, "
            f"got {[tuple(h.shape) for h in factors]}; build them with hadamard_factors({n}, device)"
        )
    lead = x.shape[:-1]
    batch = math.prod(lead) if lead else 1
    y = x.reshape(batch, n)
    outer = batch
    for a, h in zip(sizes, factors):
        rest = n * batch // (outer * a)
        y = y.reshape(outer, a) @ h if rest == 1 else torch.matmul(h, y.reshape(outer, a, rest))
        outer *= a
    return y.reshape(*lead, n)
