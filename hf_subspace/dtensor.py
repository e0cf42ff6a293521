"""Reading FSDP2's DTensor shards of θ0: is a tensor one, which rows this rank holds, statistics and sums over the
shards, and the adapted weight ``θ0 + δ`` of a shard.

What the layers below the engine need from FSDP2 (``layout``'s fingerprints, the engine's read of a sharded
weight). Sharding a model, syncing c's gradient and accelerate's hook are in :mod:`hf_subspace.fsdp`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .products import project_rows


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return ()
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return bool(cls) and isinstance(t, cls)


def sharded_rows(t) -> tuple[int, int] | None:
    """``(start, stop)`` of the dim-0 rows this rank's local shard of ``t`` holds, for a DTensor sharded on dim 0
    over a 1-D mesh (what FSDP2 makes), else None."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if len(t.placements) != 1 or not (isinstance(t.placements[0], Shard) and t.placements[0].dim == 0):
        return None
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return int(offset[0]), int(offset[0]) + int(shape[0])


def shard_stats(t, samples: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The strided sample ``flat[::step][:samples]`` (float64) and the mean ``|value|`` of a whole tensor, from a
    DTensor's shards: each rank contributes the sampled entries it holds and its sum of ``|values|``, and one
    all-reduce of ``samples + 1`` numbers completes them (a collective: every rank calls it). The sample equals the
    unsharded one exactly; the mean differs only by the order of a float64 sum."""
    import torch.distributed as dist

    rows = sharded_rows(t)
    if rows is None:
        raise ValueError("expected a DTensor sharded on dim 0 (FSDP2), got placements "
                         f"{getattr(t, 'placements', None)}")
    local = t.to_local().detach()
    numel = t.numel()
    row_len = numel // t.shape[0] if t.shape[0] else 0
    step = max(1, numel // samples)
    idx = torch.arange(0, numel, step)[:samples]
    lo, hi = rows[0] * row_len, rows[1] * row_len
    mine = (idx >= lo) & (idx < hi)
    sample = torch.zeros(idx.numel(), dtype=torch.float64)
    flat = local.reshape(-1)
    if mine.any():
        sample[mine] = flat[(idx[mine] - lo).to(flat.device)].double().cpu()
    buf = torch.cat([sample, flat.double().abs().sum().reshape(1).cpu()])
    group = t.device_mesh.get_group()
    backend_device = t.to_local().device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    buf = buf.to(backend_device)
    dist.all_reduce(buf, group=group)
    buf = buf.cpu()
    return buf[:-1], (buf[-1] / numel).reshape(1)


def sum_of_squares(tensors: Sequence[torch.Tensor]) -> float:
    """Σ t² over whole tensors, also when some are FSDP2 shards (their local sums are all-reduced once: a
    collective when any is a DTensor). ``float()`` of a DTensor's sum would give this rank's part alone."""
    import torch.distributed as dist

    plain, sharded, group = 0.0, None, None
    for t in tensors:
        if is_dtensor(t):
            part = t.to_local().detach().double().pow(2).sum().cpu()
            sharded = part if sharded is None else sharded + part
            group = t.device_mesh.get_group()
        else:
            plain += float(t.detach().double().pow(2).sum())
    if sharded is not None:
        if dist.get_backend(group) == "nccl":  # pragma: no cover - GPUs only
            sharded = sharded.cuda()
        dist.all_reduce(sharded, group=group)
        plain += float(sharded)
    return plain


def adapted_shard(engine, slot_name: str, original, live) -> torch.Tensor:
    """θ0 + Σ λ P c of one tensor of θ on this rank's shard only, as a DTensor like ``original`` (FSDP2's sharded
    θ0 read outside its module's forward: ``plain_state_dict``, a user reading ``model.lm_head.weight``). Kinds
    with row slices (hashing, fastfood) compute only the shard's rows; the others slice their flat ``P c``."""
    from torch.distributed.tensor import DTensor


    rows = sharded_rows(original)
    if rows is None:
        raise ValueError(f"{slot_name}: θ0 is a DTensor with placements {original.placements}; only FSDP2's "
                         "dim-0 sharding over one mesh dimension is supported")
    a, b = rows
    local = original.to_local()
    out = local
    for name, state, i in live:
        slot = state.layout.slots[i]
        width = slot.numel // slot.shape[0] if slot.shape else 1
        c, lam = engine.coeffs[name], engine._scale(name, i)
        if b <= a:
            part = local.new_zeros(local.shape)
        elif state.projection.supports_row_slices:
            state.follow_device(c)
            src = c if lam is None else c * lam
            part = project_rows(src, state.projection, slot.offset + a * width, slot.offset + b * width)
            part = part.view(b - a, *slot.shape[1:])
        else:
            part = state.piece(c, i, lam)[a:b]
        out = out + part.to(local.device, local.dtype)
    return DTensor.from_local(out, original.device_mesh, original.placements, run_check=False,
                              shape=original.shape, stride=original.stride())
