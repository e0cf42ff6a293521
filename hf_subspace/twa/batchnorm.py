"""BatchNorm recalibration: after weights are averaged or moved in a subspace, the running statistics no longer
match them, so they are recomputed from data (as ``torch.optim.swa_utils.update_bn`` does, for HF batches too).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm.auto import tqdm


def recalibrate_batchnorm(
    model: nn.Module,
    dataloader: Iterable,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    forward_fn: Callable[[nn.Module, object], object] | None = None,
) -> int:
    """Recompute the running mean/variance of every BatchNorm module of ``model`` from ``dataloader``.

    The statistics are reset and re-estimated as a cumulative (equal-weight) average over the batches
    (``momentum=None`` during the pass), with the model in train mode under ``torch.no_grad()``. Afterwards
    each module's momentum and every module's train/eval mode are restored. Parameters are not changed.

    Args:
        model: any module; BatchNorm modules without running statistics (``track_running_stats=False``) are
            skipped.
        dataloader: yields dicts (HF models: ``model(**batch)``), tuples/lists (``model(batch[0])``) or tensors.
        num_batches: use at most this many batches (default: all).
        device: move batch tensors here (default: the device of the model's first parameter).
        forward_fn: ``forward_fn(model, batch)`` replaces the default call (batch already moved to ``device``).

    Returns:
        The number of BatchNorm modules recalibrated; 0 means there was nothing to do (the data is not read).
    """
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    if num_batches is not None and num_batches <= 0:
        raise ValueError(f"num_batches must be a positive integer or None, got {num_batches!r}")
    device = _default_device(model) if device is None else torch.device(device)
    forward = forward_fn or _default_forward
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in bns]
    seen = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        total = num_batches if num_batches is not None else _len_or_none(dataloader)
        with torch.no_grad():
            for batch in tqdm(dataloader, total=total, desc="recalibrating BatchNorm", disable=None):
                if num_batches is not None and seen >= num_batches:
                    break
                forward(model, _to_device(batch, device))
                seen += 1
    finally:
        for m, momentum, mean, var, count in saved:
            m.momentum = momentum
            if seen == 0:  # nothing was measured: put the old statistics back
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        for m, training in modes:
            m.training = training
    if seen == 0:
        raise ValueError("the dataloader yielded no batches; BatchNorm statistics were left unchanged")
    return len(bns)


def _default_forward(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _to_device(batch, device: torch.device | None):
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        items = [_to_device(v, device) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def _default_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _len_or_none(obj) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None
