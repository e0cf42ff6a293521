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

    With ``n = a_1·…·a_m`` and ``x`` viewed as ``(batch, a_1, …, a_m)``: apply ``H_{a_m}`` to the last axis as one
    large GEMM, then rotate that axis to the front; after ``m`` such steps every axis has been transformed and the
    axes are back in order. ``m`` GEMMs and ``m`` copies — several times faster than batched small matmuls.
    """
    n = x.shape[-1]
    bits = n.bit_length() - 1
    if n <= 0 or (1 << bits) != n:
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    batch = math.prod(lead) if lead else 1
    y = x.reshape(batch, n)
    for fb in reversed(factor_bits(bits)):
        a = 1 << fb
        h = hadamard_matrix(fb, y.device, y.dtype)
        y = (y.reshape(-1, a) @ h).reshape(batch, n // a, a).transpose(1, 2).contiguous()
    return y.reshape(*lead, n)
