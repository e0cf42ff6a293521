"""The autograd products of a projection: ``c -> P c`` (whole, rows, or entries) with ``Pᵀ g`` as backward.

None of them saves a tensor of size ``D`` for the backward, so one cached output can serve several backward
passes (gradient accumulation, activation checkpointing). Each backward is the adjoint product as an autograd
function of its own, whose backward is the forward product again: second derivatives (Hessian-vector products
in c) are exact.
"""
from __future__ import annotations

import torch


class Project(torch.autograd.Function):
    """``c -> P c``; backward ``g -> Pᵀ g`` through :class:`ProjectT`, so second derivatives are exact too."""

    @staticmethod
    def forward(ctx, c, projection):
        ctx.projection = projection
        return projection.matvec(c)

    @staticmethod
    def backward(ctx, grad):
        return ProjectT.apply(grad.contiguous(), ctx.projection), None


class ProjectT(torch.autograd.Function):
    """``g -> Pᵀ g``, the adjoint; its backward is ``P`` again (P is linear)."""

    @staticmethod
    def forward(ctx, g, projection):
        ctx.projection = projection
        return projection.rmatvec(g)

    @staticmethod
    def backward(ctx, v):
        return Project.apply(v, ctx.projection), None


class ProjectRows(torch.autograd.Function):
    """``c -> (P c)[start:stop]`` with backward ``g -> P[start:stop]ᵀ g``, for projections with cheap row slices."""

    @staticmethod
    def forward(ctx, c, projection, start, stop):
        ctx.projection, ctx.start, ctx.stop = projection, start, stop
        return projection.matvec_rows(c, start, stop)

    @staticmethod
    def backward(ctx, grad):
        return ProjectRowsT.apply(grad, ctx.projection, ctx.start, ctx.stop), None, None, None


class ProjectRowsT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, projection, start, stop):
        ctx.projection, ctx.start, ctx.stop = projection, start, stop
        return projection.rmatvec_rows(g, start, stop)

    @staticmethod
    def backward(ctx, v):
        return ProjectRows.apply(v, ctx.projection, ctx.start, ctx.stop), None, None, None


class ProjectAt(torch.autograd.Function):
    """``c -> (P c)[positions]`` with backward ``g -> P[positions]ᵀ g`` (positions distinct)."""

    @staticmethod
    def forward(ctx, c, projection, positions):
        ctx.projection = projection
        ctx.save_for_backward(positions)
        return projection.matvec_at(c, positions)

    @staticmethod
    def backward(ctx, grad):
        (positions,) = ctx.saved_tensors
        return ProjectAtT.apply(grad, ctx.projection, positions), None, None


class ProjectAtT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, projection, positions):
        ctx.projection = projection
        ctx.save_for_backward(positions)
        return projection.rmatvec_at(g, positions)

    @staticmethod
    def backward(ctx, v):
        (positions,) = ctx.saved_tensors
        return ProjectAt.apply(v, ctx.projection, positions), None, None


def project(c: torch.Tensor, projection) -> torch.Tensor:
    """``P c``, differentiable in ``c`` when autograd needs it."""
    if torch.is_grad_enabled() and c.requires_grad:
        return Project.apply(c, projection)
    return projection.matvec(c.detach())


def project_rows(c: torch.Tensor, projection, start: int, stop: int) -> torch.Tensor:
    """``(P c)[start:stop]``, differentiable in ``c`` when autograd needs it."""
    if torch.is_grad_enabled() and c.requires_grad:
        return ProjectRows.apply(c, projection, start, stop)
    return projection.matvec_rows(c.detach(), start, stop)


def project_at(c: torch.Tensor, projection, positions: torch.Tensor) -> torch.Tensor:
    """``(P c)[positions]``, differentiable in ``c`` when autograd needs it."""
    if torch.is_grad_enabled() and c.requires_grad:
        return ProjectAt.apply(c, projection, positions)
    return projection.matvec_at(c.detach(), positions)
