"""Training on several processes (torchrun, ``accelerate launch``): every rank must build the same ``P``.

Under DDP every rank regenerates ``P`` from ``(kind, D, d, seed, format)`` on CPU generators and holds θ0 itself;
only the gradients of what requires grad — ``c``, the SAID scales and ``modules_to_save`` — are all-reduced:
``4·d`` bytes per step (float32) plus the head, against ``4·D`` for full fine-tuning. Nothing checks that the
ranks' ``P`` agree, and ranks that built different ones would train on silently (DDP only averages ``Pᵀ g``, a
d-vector whose meaning differs per rank). Hence:

* :func:`projection_fingerprint` — what a rank's subspace is: per adapter the kind, ``D``, ``d``, seed, format,
  mode, the layout hash (names and shapes of θ), the names and shapes of everything trainable, and a few entries
  of ``P c`` for a fixed ``c`` (rows at the start, the middle and the end of θ: they catch another library or
  torch version that draws another ``P`` from the same seed).
* :func:`check_projections_match` — every rank gathers every fingerprint and compares it with rank 0's; on a
  difference every rank raises :class:`ProjectionMismatchError` naming the ranks and what differs. The
  :class:`~hf_subspace.SubspaceTrainer` calls it when training starts; call it yourself in an accelerate loop.
* :func:`refuse_sharded_training` — FSDP2 is supported (:mod:`hf_subspace.fsdp`: θ0 sharded, c replicated);
  FSDP1 (flat parameters), DeepSpeed ZeRO-3 and TWA under FSDP are refused with what to use instead.

Counting the bytes the collectives send is benchmark instrumentation: ``CommCounter`` lives in
``benchmarks/_comm.py``.
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .engine import find_engine
from .errors import ProjectionMismatchError  # a RuntimeError, importable from here as before
from .fsdp import TWA_SHARDED_HELP, refuse_unsupported, sync_subspace_gradients  # TWA_SHARDED_HELP: as before

logger = logging.getLogger(__name__)

#: rows of ``P c`` compared at each of three places of θ (start, middle, end)
FINGERPRINT_ROWS = 8
#: the fixed ``c`` the fingerprint's entries are computed from is drawn from this seed (CPU generator)
FINGERPRINT_SEED = 20_240_917
#: entries of ``P c`` agree across ranks to this relative tolerance (GPU and CPU round differently; another seed
#: or another P gives unrelated numbers, off by their own size)
ENTRY_RTOL = 1e-4


# ------------------------------------------------------------------------------------------------------------
# the fingerprint
# ------------------------------------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate wrappers (``.module``), so the names are the user's."""
    while isinstance(getattr(model, "module", None), nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "OptimizedModule"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def _peft_configs(model: nn.Module) -> dict:
    cfgs = getattr(model, "peft_config", None)
    return cfgs if isinstance(cfgs, dict) else {}


def projection_entries(projection, rows: int = FINGERPRINT_ROWS) -> list[float]:
    """A few entries of ``P c`` for a fixed ``c`` (drawn from :data:`FINGERPRINT_SEED`): ``rows`` rows at the
    start, the middle and the end of θ, as Python floats (float32 values)."""
    g = torch.Generator(device="cpu").manual_seed(FINGERPRINT_SEED)
    c = torch.randn(projection.d, generator=g, dtype=torch.float32)
    D, n = projection.D, min(rows, projection.D)
    starts = sorted({0, max(0, D // 2 - n // 2), D - n})
    with torch.no_grad():
        out = [projection.matvec_rows(c.to(projection.device), a, a + n).float().cpu() for a in starts]
    return torch.cat(out).tolist()


def projection_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What this rank's subspace is (see the module docstring): ``{"adapters": {name: {...}}, "trainable": hash,
    "active": [...]}``; ``{}`` for a model without a subspace adapter."""
    model = _unwrap(model)
    engine = find_engine(model)
    if engine is None:
        return {}
    cfgs = _peft_configs(model)
    adapters = {}
    for name, state in engine.adapters.items():
        proj = state.projection
        cfg = cfgs.get(name)
        fmt = getattr(cfg, "projection_format", None) or getattr(proj, "format", 1)
        adapters[name] = {
            "kind": proj.kind, "D": int(proj.D), "d": int(proj.d), "seed": int(proj.seed), "format": int(fmt),
            "mode": state.mode, "layout_hash": state.layout.layout_hash(),
            "projection_options": repr(sorted((getattr(cfg, "projection_options", None) or {}).items())),
            "entries": projection_entries(proj),
        }
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if p.requires_grad:
            h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
    return {"hf_subspace_version": __version__, "torch_version": torch.__version__, "adapters": adapters,
            "active": list(engine.active), "trainable": h.hexdigest()[:16]}


def _entries_close(a: list[float], b: list[float]) -> tuple[bool, float]:
    if len(a) != len(b):
        return False, math.inf
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    diff = float((ta - tb).abs().max()) if len(a) else 0.0
    scale = float(ta.abs().max()) if len(a) else 0.0
    return diff <= ENTRY_RTOL * max(scale, 1e-30), diff


def fingerprint_differences(reference: dict, other: dict) -> list[str]:
    """What differs between two fingerprints, in words (``other`` against ``reference``); ``[]`` when they match."""
    if not reference or not other:
        if bool(reference) != bool(other):
            return ["one has a subspace adapter and the other has none"]
        return []
    out = []
    ref_ad, oth_ad = reference["adapters"], other["adapters"]
    if set(ref_ad) != set(oth_ad):
        out.append(f"adapters {sorted(oth_ad)} where rank 0 has {sorted(ref_ad)}")
    for name in sorted(set(ref_ad) & set(oth_ad)):
        r, o = ref_ad[name], oth_ad[name]
        fields = [f"{k}={o[k]!r} where rank 0 has {k}={r[k]!r}" for k in
                  ("kind", "D", "d", "seed", "format", "mode", "projection_options") if r[k] != o[k]]
        if r["layout_hash"] != o["layout_hash"]:
            fields.append(f"another θ (layout hash {o['layout_hash']} where rank 0 has {r['layout_hash']}: other "
                          "target_modules / exclude_modules, or another model)")
        if not fields:
            close, diff = _entries_close(r["entries"], o["entries"])
            if not close:
                fields.append(f"the same (kind, D, d, seed, format) but other entries of P (max |Δ| = {diff:.3g}): "
                              f"another hf_subspace or torch version draws another P (rank 0: hf_subspace "
                              f"{reference['hf_subspace_version']}, torch {reference['torch_version']}; this rank: "
                              f"hf_subspace {other['hf_subspace_version']}, torch {other['torch_version']})")
        if fields:
            out.append(f"adapter {name!r}: " + ", ".join(fields))
    if reference["active"] != other["active"]:
        out.append(f"active adapters {other['active']} where rank 0 has {reference['active']}")
    if reference["trainable"] != other["trainable"] and not out:
        out.append("other trainable parameters (names, shapes or dtypes; e.g. other modules_to_save)")
    return out


def check_projections_match(model: nn.Module, group=None) -> dict:
    """Compare this rank's :func:`projection_fingerprint` with rank 0's; raise on every rank when any differs.

    A collective: every rank of ``group`` (default: the whole world) must call it. Without an initialized process
    group, or with one process, it only returns the local fingerprint. For an accelerate loop call it after
    ``accelerator.prepare(model, ...)`` (or before; it unwraps DDP)::

        model = accelerator.prepare(model)
        hf_subspace.check_projections_match(model)

    Under FSDP2 it also checks the sharding (:func:`check_fsdp2_model`): c and λ must not be sharded into an FSDP
    group, and their gradients are averaged after each backward (the hook is added when ``fully_shard`` was
    applied by hand with ``ignored_params``).

    Raises:
        ProjectionMismatchError: naming the ranks that differ and what differs (seed, D, d, format, θ, P's entries).
        ValueError: c sharded into an FSDP group (use :func:`hf_subspace.shard_model`), or TWA under FSDP2.
    """
    import torch.distributed as dist

    if any(_is_fsdp_module(m) for m in model.modules()) and sharding_kind(model) == "FSDP2":
        check_fsdp2_model(model)  # fully_shard by hand: c must be whole, and its gradient averaged after backward
    fp = projection_fingerprint(model)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return fp
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, fp, group=group)
    problems = []
    for rank, other in enumerate(gathered[1:], start=1):
        diffs = fingerprint_differences(gathered[0], other)
        if diffs:
            problems.append(f"rank {rank} has " + "; ".join(diffs))
    if problems:
        raise ProjectionMismatchError(
            "the processes of this run built different subspaces, so their gradients of c would be averaged across "
            "different P: " + " | ".join(problems) + ". Every process must build the same P: the same seed "
            "(SubspaceConfig.seed / --subspace_seed), the same target_modules and base model, and the same "
            "hf_subspace and torch versions (or an adapter saved with save_projection=True).")
    return fp


def average_batchnorm_statistics(model: nn.Module, group=None) -> int:
    """Average every BatchNorm's running mean and variance over the ranks (one all-reduce each); returns how many
    modules were averaged (0 without a process group).

    BatchNorm recalibration reads each rank's share of the data, so the ranks end with different statistics: the
    average of equal-sized shares is the mean over all the batches (running_mean exactly; running_var as the mean
    of the per-batch variances, as one process computes it with ``momentum=None``).
    """
    import torch.distributed as dist
    from torch.nn.modules.batchnorm import _BatchNorm

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0
    world = dist.get_world_size(group)
    bns = [m for m in _unwrap(model).modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in bns:
        for t in (m.running_mean, m.running_var):
            if t is not None:
                dist.all_reduce(t, group=group)
                t.div_(world)
    return len(bns)


# ------------------------------------------------------------------------------------------------------------
# sharded θ0: FSDP2 works (hf_subspace.fsdp); FSDP1 and DeepSpeed ZeRO-3 are refused
# ------------------------------------------------------------------------------------------------------------
SHARDED_HELP = (
    "FSDP1 (FullyShardedDataParallel, flat parameters) and DeepSpeed ZeRO-3 shard θ0 in ways the engine cannot "
    "read: a subspace adapter reads every tensor of θ whole inside its module's forward (θ0 + P c). Use FSDP2 "
    "instead — `accelerate launch --config_file examples/accelerate/fsdp2.yaml` (fsdp_version: 2), "
    "SubspaceTrainer with fsdp=True and fsdp_config={'version': 2}, or hf_subspace.shard_model(model) in "
    "a loop of one's own — which shards θ0 and keeps c whole on every rank; or DDP (`accelerate launch "
    "--config_file examples/accelerate/multi_gpu.yaml`, distributed_type: MULTI_GPU), which sends only the "
    "gradient of c (4·d bytes per step) and keeps a whole θ0 on each rank.")


def _is_fsdp_module(module: nn.Module) -> bool:
    from torch.distributed import fsdp

    kinds = tuple(getattr(fsdp, k) for k in ("FullyShardedDataParallel", "FSDPModule") if hasattr(fsdp, k))
    return isinstance(module, kinds)


def _is_fsdp1_module(module: nn.Module) -> bool:
    from torch.distributed import fsdp

    return hasattr(fsdp, "FullyShardedDataParallel") and isinstance(module, fsdp.FullyShardedDataParallel)


def _is_sharded_tensor(p: torch.Tensor) -> bool:
    """An FSDP2 parameter (a DTensor) or an FSDP1 ``FlatParameter``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    return isinstance(p, DTensor) or type(p).__name__ == "FlatParameter"


def sharding_in_use(model: nn.Module | None = None, accelerator=None) -> str | None:
    """``"FSDP"`` / ``"DeepSpeed ZeRO-3"`` when ``model`` is FSDP-wrapped or ``accelerator`` (an
    ``accelerate.Accelerator`` or its state) runs FSDP or ZeRO stage 3; else None. (:func:`sharding_kind` tells
    FSDP1 from FSDP2.)"""
    kind = sharding_kind(model, accelerator)
    return None if kind is None else ("FSDP" if kind.startswith("FSDP") else kind)


def sharding_kind(model: nn.Module | None = None, accelerator=None) -> str | None:
    """``"FSDP1"``, ``"FSDP2"``, ``"DeepSpeed ZeRO-3"`` or None, from the model's modules and parameters, or from
    ``accelerator``'s state (its FSDP plugin's ``fsdp_version``)."""
    if model is not None:
        if any(_is_fsdp1_module(m) for m in model.modules()):
            return "FSDP1"
        if any(_is_fsdp_module(m) for m in model.modules()):
            return "FSDP2"
        for p in model.parameters():  # the root may be wrapped elsewhere: its parameters tell
            if hasattr(p, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
                return "DeepSpeed ZeRO-3"
            if type(p).__name__ == "FlatParameter":
                return "FSDP1"
            if _is_sharded_tensor(p):
                return "FSDP2"
    if accelerator is not None:
        state = getattr(accelerator, "state", accelerator)
        kind = str(getattr(getattr(state, "distributed_type", None), "value", getattr(state, "distributed_type", "")))
        plugin = getattr(state, "fsdp_plugin", None)
        if kind.upper() == "FSDP" or plugin is not None:
            return "FSDP2" if getattr(plugin, "fsdp_version", 1) == 2 else "FSDP1"
        plugin = getattr(state, "deepspeed_plugin", None)
        if kind.upper() == "DEEPSPEED" or plugin is not None:
            stage = getattr(plugin, "zero_stage", None)
            if stage is None and plugin is not None:
                stage = (getattr(plugin, "deepspeed_config", None) or {}).get("zero_optimization", {}).get("stage")
            if stage == 3:
                return "DeepSpeed ZeRO-3"
    return None


def check_fsdp2_model(model: nn.Module) -> None:
    """A subspace model under FSDP2: refuse c sharded into an FSDP group (``fully_shard`` applied without
    ``ignored_params``), make sure c's gradient is averaged after each backward and the inference cache is off."""
    engine = find_engine(_unwrap(model))
    if engine is None:
        return
    refuse_unsupported(model)
    sharded = [n for n, p in engine.vectors.named_parameters() if _is_sharded_tensor(p)]
    if sharded:
        raise ValueError(
            f"c / λ of the subspace adapter ({', '.join(sharded)}) were sharded into an FSDP group (fully_shard "
            "applied without ignored_params): each rank would hold a slice of c while every layer needs all of it. "
            "Shard the model with hf_subspace.shard_model(model), which keeps c and λ whole (float32) on every rank")
    engine.inference_cache = False
    sync_subspace_gradients(_unwrap(model))


def refuse_sharded_training(model: nn.Module | None = None, accelerator=None, what: str = "subspace training") -> None:
    """Raise a ValueError saying what to use instead when θ0 would be sharded in a way the engine cannot read
    (FSDP1, DeepSpeed ZeRO-3, TWA under any FSDP); FSDP2 is let through (checked by :func:`check_fsdp2_model`
    when a model is given).

    DeepSpeed ZeRO-1/2 shard only the optimizer state (here: of c, tiny); they are let through with a warning that
    they are untested (deepspeed is not installed where hf_subspace is tested).
    """
    kind = sharding_kind(model, accelerator)
    if kind == "FSDP2" and what == "TWA":
        raise ValueError(f"TWA is refused under FSDP2: {TWA_SHARDED_HELP}")
    if kind == "FSDP2":
        if model is not None and any(_is_fsdp_module(m) for m in model.modules()):
            check_fsdp2_model(model)
        return
    if kind is not None:
        label = "FSDP" if kind == "FSDP1" else kind
        raise ValueError(f"{what} is refused under {label}{' (version 1)' if kind == 'FSDP1' else ''}: "
                         f"{SHARDED_HELP}")
    state = getattr(accelerator, "state", accelerator) if accelerator is not None else None
    if state is not None and getattr(state, "deepspeed_plugin", None) is not None:
        logger.warning("%s under DeepSpeed ZeRO stage %s is untested: ZeRO-1/2 shard only the optimizer state of c, "
                       "which should work, but compare a few steps with DDP before relying on it", what,
                       getattr(state.deepspeed_plugin, "zero_stage", "?"))


def refuse_sharded_merge(model: nn.Module) -> None:
    """Merging into a sharded θ0 (FSDP, DeepSpeed ZeRO-3) is refused, as PEFT refuses it."""
    kind = sharding_in_use(model)
    if kind is None:
        try:
            from transformers.integrations import is_deepspeed_zero3_enabled

            kind = "DeepSpeed ZeRO-3" if is_deepspeed_zero3_enabled() else None
        except ImportError:  # pragma: no cover - transformers always has it
            kind = None
    if kind is not None:
        raise ValueError(f"merging a subspace adapter under {kind} is unsupported (θ0 is sharded), as in PEFT: save "
                         "the adapter (model.save_pretrained(path); under FSDP2 on the main process alone: it writes "
                         "only c and the config), then load it onto the whole base on one process "
                         "(PeftModel.from_pretrained(base, path).merge_and_unload())")


__all__ = [
    "average_batchnorm_statistics",
    "ProjectionMismatchError",
    "check_projections_match",
    "fingerprint_differences",
    "projection_entries",
    "projection_fingerprint",
    "refuse_sharded_merge",
    "refuse_sharded_training",
    "check_fsdp2_model",
    "sharding_in_use",
    "sharding_kind",
]

_MOVED_TO_BENCHMARKS = {"CommCounter", "CommCountCallback"}


def __getattr__(name: str):
    """``CommCounter`` / ``CommCountCallback`` were here up to 0.2.0: say where they went instead of a bare error."""
    if name in _MOVED_TO_BENCHMARKS:
        raise ImportError(
            f"hf_subspace.distributed.{name} moved out of the library in 0.3.0: it is benchmark instrumentation and "
            f"lives in the repository's benchmarks/_comm.py (`from _comm import {name}` with benchmarks/ on "
            "sys.path); copy that file to use it outside the repository")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
