"""The autograd products of a projection: ``c -> P c`` (whole, rows, or entries) with ``Pᵀ g`` as backward.

None of them saves a tensor of size ``D`` for the backward, so one cached output can serve several backward
passes (gradient accumulation, activation checkpointing). Each backward is the adjoint product as an autograd
function of its own, whose backward is the forward product again: second derivatives (Hessian-vector products
in c) are exact.

Every product runs with autocast off, whatever the caller's context: δ is float32 for every kind (fastfood's
Hadamard matmuls included), and the backward's recompute (outside autocast) equals the forward's bit for bit.
"""
from __future__ import annotations

import torch


class LinearProduct(torch.autograd.Function):
    """``x -> projection.<op>(x, *args)`` for a linear ``op``; its backward is ``projection.<adjoint>`` as a
    :class:`LinearProduct` again (ops and adjoints swapped), so second derivatives are exact too.

    The pairs: ``matvec``/``rmatvec`` (whole), ``matvec_rows``/``rmatvec_rows`` (``args = (start, stop)``),
    ``matvec_at``/``rmatvec_at`` (``args = (positions,)``, distinct).
    """

    @staticmethod
    def forward(ctx, x, projection, op, adjoint, args):
        ctx.projection, ctx.op, ctx.adjoint, ctx.args = projection, op, adjoint, args
        return run(projection, op, x, *args)

    @staticmethod
    def backward(ctx, grad):
        return LinearProduct.apply(grad.contiguous(), ctx.projection, ctx.adjoint, ctx.op, ctx.args), None, None, \
            None, None


def _product(c: torch.Tensor, projection, op: str, adjoint: str, *args) -> torch.Tensor:
    """``projection.<op>(c, *args)``, differentiable in ``c`` when autograd needs it."""
    if torch.is_grad_enabled() and c.requires_grad:
        return LinearProduct.apply(c, projection, op, adjoint, args)
    return run(projection, op, c, *args)  # products read c.detach() themselves: c itself lets them key caches on it


def run(projection, op: str, *args) -> torch.Tensor:
    """``projection.<op>(*args)`` in float32: autocast off (as peft does inside its own parametrizations)."""
    with torch.autocast(projection.device.type, enabled=False):
        return getattr(projection, op)(*args)


def project(c: torch.Tensor, projection) -> torch.Tensor:
    """``P c``, differentiable in ``c`` when autograd needs it."""
    return _product(c, projection, "matvec", "rmatvec")


def project_rows(c: torch.Tensor, projection, start: int, stop: int) -> torch.Tensor:
    """``(P c)[start:stop]``, differentiable in ``c`` when autograd needs it."""
    return _product(c, projection, "matvec_rows", "rmatvec_rows", start, stop)


def project_at(c: torch.Tensor, projection, positions: torch.Tensor) -> torch.Tensor:
    """``(P c)[positions]``, differentiable in ``c`` when autograd needs it."""
    return _product(c, projection, "matvec_at", "rmatvec_at", positions)
