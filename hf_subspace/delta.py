"""One adapter's delta ``P c``: whole (cached for the step), per tensor of θ, or for some rows of one tensor.

Projections with cheap row slices (hashing, fastfood) compute each tensor's delta on the fly (hashing: one gather
forward, one roll-and-sum backward); the others cache the flat ``P c`` until ``c`` changes (checked on the host:
:mod:`hf_subspace.cache`) and run ``Pᵀ g`` once per backward.
"""
from __future__ import annotations

import weakref

import torch

from .cache import values_token
from .layout import ThetaLayout
from .products import project, project_at, project_rows
from .projections import Projection


class Scratch:
    """Per-process scratch state (caches of computed tensors). A deepcopy starts empty."""

    def __deepcopy__(self, memo):
        return type(self)()


class AdapterSubspace:
    """One adapter: its layout, its projection and mode, and the cached flat ``P c`` (no parameters of its own)."""

    def __init__(self, layout: ThetaLayout, projection: Projection, mode: str):
        self.layout = layout
        self.projection = projection
        self.mode = mode
        self.scratch = Scratch()

    @property
    def cached_delta(self) -> torch.Tensor | None:
        """The flat ``P c`` kept for the current step, if any (row-sliced kinds keep none)."""
        return getattr(self.scratch, "flat", None)

    def follow_device(self, c: torch.Tensor) -> None:
        if not c.is_meta and self.projection.device != c.device:
            self.projection.to(c.device)
            self.invalidate()

    def flat_delta(self, c: torch.Tensor) -> torch.Tensor:
        """``P c`` of shape ``(D,)`` (float32), recomputed only when ``c`` changed since the last call."""
        self.follow_device(c)
        s = self.scratch
        # the same c object, unchanged: version, .data accesses and optimizer steps (fused optimizers bump no
        # version), all read on the host (hf_subspace.cache) — no value comparison, so no device sync
        key = (values_token([c]), torch.is_grad_enabled() and c.requires_grad)
        if getattr(s, "flat", None) is None or s.key != key or s.c_ref() is not c:
            s.flat = project(c, self.projection)
            # one split node for all tensors: its backward concatenates the per-tensor gradients in one pass
            sizes = [slot.numel for slot in self.layout.slots]
            s.pieces = [piece.view(slot.shape) for piece, slot in zip(torch.split(s.flat, sizes), self.layout.slots)]
            s.key, s.c_ref = key, weakref.ref(c)
        return s.flat

    def piece(self, c: torch.Tensor, i: int, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``λ_i P_i c``: the part of ``P c`` for tensor ``i`` of the layout, in its shape (float32)."""
        slot = self.layout.slots[i]
        if self.projection.supports_row_slices:
            self.follow_device(c)
            src = c if scale is None else c * scale
            return project_rows(src, self.projection, slot.offset, slot.offset + slot.numel).view(slot.shape)
        if torch.compiler.is_compiling():
            # a tensor kept across compiled calls would carry the compiled graph's saved tensors, freed by the
            # first backward: recompute instead (AOT autograd's CSE merges the repeats within one graph)
            piece = project(c, self.projection)[slot.offset: slot.offset + slot.numel].view(slot.shape)
        else:
            self.flat_delta(c)
            piece = self.scratch.pieces[i]
        return piece if scale is None else piece * scale

    def rows(self, c: torch.Tensor, i: int, rows: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``rows`` (int64, repeats allowed: an embedding's token ids) of ``λ_i P_i c`` reshaped as tensor
        ``i``: ``(len(rows), ...)``. Kinds with row slices need ``projection.entries_sync_free`` (their
        ``rmatvec_at`` accumulates repeated positions)."""
        slot = self.layout.slots[i]
        if not self.projection.supports_row_slices:
            return self.piece(c, i, scale)[rows]
        self.follow_device(c)
        device = self.projection.device
        width = slot.numel // slot.shape[0]
        positions = rows.to(device).unsqueeze(1) * width + torch.arange(width, device=device) + slot.offset
        src = c if scale is None else c * scale
        return project_at(src, self.projection, positions).view(len(rows), *slot.shape[1:])

    def invalidate(self) -> None:
        self.scratch = Scratch()
