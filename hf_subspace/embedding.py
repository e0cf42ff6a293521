"""Embeddings pay for the rows a batch reads: ``E[ids] = θ0[ids] + δ[ids]``, ``δ`` for the distinct ids only.

A plain ``nn.Embedding`` in θ gets a forward that looks its rows up in θ0 and adds the subspace delta of those
rows alone (hashing: a gather of their positions forward, a scatter of their gradient backward), with the same
values and gradients as expanding the whole table. Subclasses with their own ``forward`` (scaled embeddings)
keep the whole-table path. Without autograd the whole (cached) table is read, as the plain layer does.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .tuner.layer import override_forward, sole_subspace_layer


def use_row_path_if_embedding(module: nn.Module, attr: str) -> None:
    """Give a plain ``nn.Embedding``'s parametrized class the row-path forward (this module alone)."""
    if attr == "weight" and isinstance(module, nn.Embedding):
        override_forward(module, nn.Embedding, row_path_embedding_forward)


def row_path_embedding_forward(self: nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    layer = sole_subspace_layer(self)
    engine = None if layer is None else layer.engine
    if engine is None or not engine.row_path_embeddings or self.max_norm is not None or self.sparse:
        return nn.Embedding.forward(self, input)
    original = self.parametrizations.weight.original
    slot_name = layer.slot_name
    if engine.wants_whole_tensor(slot_name, original):
        return nn.Embedding.forward(self, input)
    out = F.embedding(input, original, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq, False)
    rows, inverse = torch.unique(input, return_inverse=True)
    delta = engine.rows_delta(slot_name, rows)
    if delta is None:
        return out
    pad = None
    if self.padding_idx is not None:  # F.embedding sends no gradient through the padding row: neither do we
        hit = (rows == self.padding_idx).nonzero()
        pad = int(hit[0, 0]) if len(hit) else None
    return out + F.embedding(inverse, delta.to(original.dtype), pad, None, 2.0, self.scale_grad_by_freq, False)
