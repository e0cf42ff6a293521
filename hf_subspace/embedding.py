"""Embeddings pay for the rows a batch reads: ``E[ids] = θ0[ids] + δ[ids]``, ``δ`` for the batch's tokens only.

A plain ``nn.Embedding`` in θ gets a forward that looks its rows up in θ0 and adds the subspace delta of each
token's row (hashing: a gather of their positions forward, an ``index_add`` of their gradient backward, repeated
tokens accumulating), with the same values as expanding the whole table and the same gradients up to the order of
summation. Nothing in it depends on the values of the ids (no ``unique``, no ``nonzero``): no device→host sync and
no data-dependent shape. The padding row's delta is added but gets no gradient, as ``F.embedding`` does.

The whole-table path (the plain layer reading the adapted weight) is kept for subclasses with their own
``forward`` (scaled embeddings), ``max_norm``, ``sparse``, ``scale_grad_by_freq``, batches with at least as many
tokens as the table has rows (the whole table is then no more work), projections whose per-entry
products are not sync-free (fastfood: its blocks would have to be deduplicated), and reads without autograd (the
whole, cached table is read, as the plain layer does).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .layer import override_forward, sole_subspace_layer


def use_row_path_if_embedding(module: nn.Module, attr: str) -> None:
    """Give a plain ``nn.Embedding``'s parametrized class the row-path forward (this module alone)."""
    if attr == "weight" and isinstance(module, nn.Embedding):
        override_forward(module, nn.Embedding, row_path_embedding_forward)


def _rows_are_sync_free(engine, slot_name: str) -> bool:
    return all(not state.projection.supports_row_slices or getattr(state.projection, "entries_sync_free", False)
               for _, state, _ in engine._live(slot_name))


def row_path_embedding_forward(self: nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    layer = sole_subspace_layer(self)
    engine = None if layer is None else layer.engine
    if (engine is None or not engine.row_path_embeddings or self.max_norm is not None or self.sparse
            or self.scale_grad_by_freq):
        return nn.Embedding.forward(self, input)
    original = self.parametrizations.weight.original
    slot_name = layer.slot_name
    if (engine.wants_whole_tensor(slot_name, original) or not _rows_are_sync_free(engine, slot_name)
            or input.numel() >= self.num_embeddings):  # as many tokens as rows: the whole table costs no more
        return nn.Embedding.forward(self, input)
    out = F.embedding(input, original, self.padding_idx, None, self.norm_type, False, False)
    delta = engine.rows_delta(slot_name, input.reshape(-1))
    if delta is None:
        return out
    delta = delta.view(*input.shape, *delta.shape[1:]).to(original.dtype)
    if self.padding_idx is not None:  # F.embedding sends no gradient through the padding row: neither do we
        delta = torch.where((input == self.padding_idx).unsqueeze(-1), delta.detach(), delta)
    return out + delta
