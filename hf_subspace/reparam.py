"""Reparameterize any ``torch.nn.Module`` as θ = θ0 + P c, without PEFT — and save such a model as a plain one.

The pieces live in their own modules: :mod:`hf_subspace.layout` (which tensors form θ), :mod:`hf_subspace.products`
(the autograd products of P), :mod:`hf_subspace.engine` (c, λ and θ0 + δ), :mod:`hf_subspace.embedding` (the
row path of embeddings), :mod:`hf_subspace.layer` (the per-tensor layer), :mod:`hf_subspace.validation` (d, the
projection kind and the mode).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .engine import SubspaceEngine, find_engine
from .layout import (ThetaLayout, check_targets, layout_from_names, refuse_offloaded_theta0, select_parameters,
                     under_modules_to_save)
from .plain import install_plain_save, plain_state_dict
from .projections import Projection
from .validation import MODES, validate_dim_fits, validate_subspace_args

__all__ = ["MODES", "SubspaceEngine", "ThetaLayout", "find_engine", "install_plain_save", "layout_from_names",
           "plain_state_dict", "reparameterize", "select_parameters", "validate_subspace_args"]


def reparameterize(model: nn.Module, dim: int, projection: "str | Projection" = "hashing", mode: str = "global", seed: int = 0,
                   target_modules=None, exclude_modules=None, modules_to_save: Sequence[str] = (),
                   projection_options: dict | None = None) -> SubspaceEngine:
    """Reparameterize ``model`` in place without PEFT: freeze everything, train ``engine.parameters()``.

    Returns the :class:`SubspaceEngine`, also registered on the model as ``model.subspace`` so that
    ``model.to()``, ``model.parameters()`` and ``model.state_dict()`` include it. Parameters under
    ``modules_to_save`` stay trainable in full and are left out of θ. A transformers model's
    ``save_pretrained`` then writes a plain checkpoint (θ0 + δ under the usual names; see :func:`plain_state_dict`).
    """
    validate_subspace_args(dim, None if isinstance(projection, Projection) else projection, mode)
    if isinstance(getattr(model, "subspace", None), SubspaceEngine):
        raise ValueError("this model is already reparameterized (it has a `subspace` engine)")
    check_targets(model, target_modules, exclude_modules, modules_to_save)
    layout = select_parameters(model, target_modules, exclude_modules, modules_to_save)
    refuse_offloaded_theta0(model, layout)
    validate_dim_fits(dim, mode, layout, target_modules)
    engine = SubspaceEngine()
    engine.add_adapter(model, "default", layout, dim, projection, mode, seed, projection_options=projection_options)
    for module_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            p.requires_grad_(under_modules_to_save(module_name, modules_to_save))
    model.add_module("subspace", engine)
    install_plain_save(model)
    return engine
