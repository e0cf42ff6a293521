"""FSDP2 (``torch.distributed.fsdp.fully_shard``): θ0 sharded over the ranks, c and λ replicated.

θ = θ0 + P c. Under FSDP2 θ0 is sharded like any frozen weight (each rank keeps 1/N of every tensor and
all-gathers a layer's tensors for its forward and again for its backward), while ``c`` and the SAID scales ``λ``
(d float32 numbers) stay whole on every rank, outside every FSDP group. The parametrization of each weight runs
inside its module's forward, where FSDP has already put the unsharded θ0 in place, so ``θ0 + P c`` is computed on
the gathered tensor; the backward recomputes it the same way (:mod:`hf_subspace.recompute`). θ0 needs no gradient,
so FSDP reduce-scatters nothing: what crosses the network per step is FSDP's all-gathers of θ0 and one all-reduce
of ``4·d`` bytes (c's and λ's gradients), done right after each backward (before any gradient clipping).

* :func:`shard_model` — apply ``fully_shard`` with the right grouping: each decoder layer its own unit (the
  classes of the model's ``_no_split_modules``, or ``layer_classes``), the tied embedding and head together in one
  unit (an untied embedding and head each in its own), then the root; ``c`` and ``λ`` go in ``ignored_params``
  (whatever the mixed-precision policy, they stay float32 replicas); their gradients are all-reduced (average)
  by a post-accumulate-grad hook, once per backward (with gradient accumulation, once per micro-batch: exact,
  since the part accumulated before is already equal on every rank); the engine's inference cache is turned off
  (it would hold every tensor of θ unsharded on every rank).
* accelerate: ``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, ...))`` (what
  ``accelerate launch`` with ``fsdp_version: 2`` builds, and what the Trainer builds from ``fsdp=...`` with
  ``fsdp_config={"version": 2}``) prepares a model with ``accelerate.utils.fsdp2_prepare_model``, which would
  shard c into the root group (and cast it to bf16 under a bf16 policy), miss the tie of embedding and head
  through the parametrization, and take no decoder-layer units from the PEFT wrap policy the Trainer sets. While
  hf_subspace is imported, a model holding a subspace engine is prepared by :func:`shard_model` instead, with the
  plugin's ``reshard_after_forward``, mixed-precision and offload policies and its ``transformer_cls_names_to_wrap``;
  every other model goes to accelerate's own function.
* :func:`shard_stats` / :func:`sharded_rows` / :func:`adapted_shard` / :func:`sum_of_squares` (their home is
  :mod:`hf_subspace.dtensor`, below the engine; importable from here) — a whole
  tensor's strided sample and mean ``|value|`` from shards, the rows a rank's shard of a dim-0-sharded tensor holds,
  θ0 + δ on that shard (what reading a weight outside its module's forward returns: a DTensor), ‖θ0‖² from the
  shards: the fingerprint of θ0, the plain state dict and the Trainer's learning-rate check work on DTensors
  without gathering anything of size D.

Not supported under FSDP (refused with what to do): merging into the sharded θ0 (``merge_and_unload``), TWA
(its snapshots and basis are whole tensors), FSDP1 (``FullyShardedDataParallel``: flat parameters) and DeepSpeed
ZeRO-3.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from .dtensor import adapted_shard, is_dtensor, shard_stats, sharded_rows, sum_of_squares  # noqa: F401
from .engine import find_engine
from .fingerprint import fingerprint_tensors


#: why TWA is refused under FSDP2, and what to use instead
TWA_SHARDED_HELP = (
    "TWA under FSDP is not supported: its snapshots and basis hold whole tensors of θ on every rank. Use DDP for "
    "TWA (`accelerate launch --config_file examples/accelerate/multi_gpu.yaml`; the basis is sharded by "
    "coordinates over the ranks with twa_shard_basis=True), or a random projection (hashing, fastfood) under FSDP2")


__all__ = ["shard_model", "is_fsdp2_sharded", "subspace_vectors", "sync_subspace_gradients", "shard_stats",
           "sharded_rows", "sum_of_squares", "adapted_shard", "install_accelerate_hook", "decoder_layers"]


def is_fsdp2_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or a module inside it) is an FSDP2 module (``fully_shard`` applied)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def subspace_vectors(model: nn.Module) -> list[nn.Parameter]:
    """c and λ of every adapter of ``model``'s engine (the parameters kept out of FSDP's groups)."""
    engine = find_engine(model)
    return [] if engine is None else list(engine.vectors.parameters())


# ------------------------------------------------------------------------------------------------------------
# grouping
# ------------------------------------------------------------------------------------------------------------
def _no_split_class_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        for n in getattr(m, "_no_split_modules", None) or ():
            names.add(n)
    return names


def decoder_layers(model: nn.Module, layer_classes: Iterable | None = None) -> list[nn.Module]:
    """The modules that get an FSDP unit of their own: instances of ``layer_classes`` (classes or class names),
    by default of the model's ``_no_split_modules`` (transformers' decoder / encoder layers). Outermost matches
    only; order of ``model.modules()``."""
    wanted = list(layer_classes) if layer_classes is not None else sorted(_no_split_class_names(model))
    names = {c if isinstance(c, str) else c.__name__ for c in wanted}
    out, inside = [], set()
    for m in model.modules():
        if id(m) in inside:
            continue
        inner = getattr(m, "_checkpoint_wrapped_module", m)
        if type(inner).__name__ in names:
            out.append(m)
            inside.update(id(x) for x in m.modules())
    return out


def _embedding_and_head(model: nn.Module):
    """The input embedding and output head of a transformers model inside ``model`` (PeftModel, base), or Nones."""
    for m in model.modules():
        get_in, get_out = getattr(m, "get_input_embeddings", None), getattr(m, "get_output_embeddings", None)
        if callable(get_in) and callable(get_out) and hasattr(m, "config"):
            try:
                emb, head = get_in(), get_out()
            except (NotImplementedError, AttributeError):
                continue
            if emb is not None:
                return emb, head
    return None, None


def _weight_tensor(module: nn.Module | None):
    """A module's weight as stored: θ0 (the parametrization's ``original``) for a tensor of θ, else the parameter."""
    if module is None:
        return None
    plist = getattr(module, "parametrizations", None)
    if plist is not None and "weight" in plist:
        return plist["weight"].original
    return module._parameters.get("weight")


# ------------------------------------------------------------------------------------------------------------
# c's gradient: all-reduced right after each backward
# ------------------------------------------------------------------------------------------------------------
def _average_grad_hook(group):
    import torch.distributed as dist

    def hook(p: torch.Tensor) -> None:
        if p.grad is None or not dist.is_initialized():
            return
        world = dist.get_world_size(group)
        if world == 1:
            return
        # SUM then divide: ReduceOp.AVG exists on NCCL only (gloo refuses it). After an earlier backward of the same
        # step the accumulated part is already equal on every rank, so averaging the running sum is exact.
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
        p.grad.div_(world)

    return hook


def sync_subspace_gradients(model: nn.Module, group=None) -> list[nn.Parameter]:
    """Register (once) on c and λ of ``model``'s engine a hook that all-reduces (averages) their gradient as soon
    as autograd has accumulated it, i.e. at the end of every backward, before any clipping or optimizer step.
    Returns the parameters hooked."""
    engine = find_engine(model)
    if engine is None:
        return []
    handles = engine.__dict__.setdefault("_fsdp_grad_hooks", {})
    params = list(engine.vectors.parameters())
    for p in params:
        if id(p) not in handles:
            handles[id(p)] = p.register_post_accumulate_grad_hook(_average_grad_hook(group))
    return params


# ------------------------------------------------------------------------------------------------------------
# shard_model
# ------------------------------------------------------------------------------------------------------------
def shard_model(model: nn.Module, *, mesh=None, reshard_after_forward: bool | int | None = True,
                mp_policy=None, offload_policy=None, layer_classes: Iterable | None = None,
                ignored_params: Iterable[nn.Parameter] = (), group=None) -> nn.Module:
    """Shard a subspace model (a PeftModel from ``get_peft_model(..., SubspaceConfig(...))`` or a model from
    :func:`hf_subspace.reparameterize`) with torch's FSDP2, in place; returns ``model``.

    Each decoder layer (``layer_classes``, default: the classes of the model's ``_no_split_modules``) becomes its
    own FSDP unit, then the embedding and head (one unit when they are tied: they share one θ0), then the root.
    c and the SAID scales are left out of every group (``ignored_params``): they stay float32 and whole on every
    rank, whatever ``mp_policy`` says, and their gradients are averaged over the ranks right after each backward
    (:func:`sync_subspace_gradients`). The inference cache is turned off (it would keep θ unsharded).

    Call it after wrapping the model and before building the optimizer (c is not replaced, so an optimizer built
    before works too). Every rank must call it, with a process group initialized.

    Raises:
        ValueError: without a subspace adapter, with a TWA adapter, or with FSDP1 already applied.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    engine = find_engine(model)
    if engine is None:
        raise ValueError("shard_model needs a model with a subspace adapter (get_peft_model(model, "
                         "SubspaceConfig(...)) or hf_subspace.reparameterize); for any other model call "
                         "torch.distributed.fsdp.fully_shard yourself")
    refuse_unsupported(model)
    if not dist.is_initialized():
        raise ValueError("shard_model needs an initialized process group (torchrun / accelerate launch, then "
                         "torch.distributed.init_process_group)")
    if isinstance(model, FSDPModule):
        return model
    _record_fingerprints(model, engine)
    vectors = subspace_vectors(model)
    ignored = set(vectors) | set(ignored_params)
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
              "offload_policy": offload_policy or OffloadPolicy(), "ignored_params": ignored}
    for layer in decoder_layers(model, layer_classes):
        if not isinstance(layer, FSDPModule):
            fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    emb, head = _embedding_and_head(model)
    w_emb, w_head = _weight_tensor(emb), _weight_tensor(head)
    if emb is not None and w_emb is not None and w_emb is w_head:
        # one θ0 read by both: one unit, kept gathered from the embedding's forward to the head's backward
        fully_shard([emb, head], reshard_after_forward=False, **kwargs)
    else:
        # kept gathered from forward to backward (reshard_after_forward=False): the embedding's backward needs no
        # θ0 (its δ rows depend on c and the token ids only), so a re-gather there would be D_emb bytes for nothing
        for m in (emb, head):
            if m is not None and not isinstance(m, FSDPModule) and any(True for _ in m.parameters()):
                fully_shard(m, reshard_after_forward=False, **kwargs)
    fully_shard(model, **kwargs)  # the root: reshard_after_forward left to torch's default for the root
    for p in vectors:
        if is_dtensor(p):  # pragma: no cover - a torch that shards ignored params would break the replica
            raise RuntimeError("fully_shard sharded c despite ignored_params; this torch version is not supported")
    # fully_shard moves the parameters it manages to the mesh's device (a GPU under torchrun) and leaves ignored
    # ones where they are: c and λ go where θ0 is computed (FSDP's compute device, also with CPU offload)
    device = getattr(model._get_fsdp_state(), "_device", None)
    if device is not None and any(p.device != device for p in vectors):
        engine.to(device)  # the engine's _apply keeps c and λ float32; P follows c on first use
    engine.inference_cache = False  # a materialized θ0 + δ per tensor would be a whole θ on every rank
    engine.invalidate()
    sync_subspace_gradients(model, group)
    return model


def _record_fingerprints(model: nn.Module, engine) -> None:
    """An adapter created on the meta device has no base fingerprint yet: record it while θ0 is whole (after
    sharding it is a collective, and saving happens on rank 0 alone)."""
    cfgs = getattr(model, "peft_config", None)
    for name, cfg in (cfgs.items() if isinstance(cfgs, dict) else ()):
        if name in engine.adapters and getattr(cfg, "layout_hash", None) is not None \
                and getattr(cfg, "base_fingerprint", "") is None:
            tensors = [engine.unmerged_original(s.name, engine.original(s.name))
                       for s in engine.adapters[name].layout.slots]
            cfg.base_fingerprint = fingerprint_tensors(tensors)


def refuse_unsupported(model: nn.Module) -> None:
    """Under FSDP2, a TWA adapter is refused with what to do; FSDP1 / ZeRO-3 are refused elsewhere."""
    engine = find_engine(model)
    if engine is None:
        return
    for name, state in engine.adapters.items():
        if state.projection.kind == "trajectory":
            raise ValueError(f"adapter {name!r} is a TWA (trajectory) basis, refused under FSDP2: {TWA_SHARDED_HELP}")


# ------------------------------------------------------------------------------------------------------------
# accelerate
# ------------------------------------------------------------------------------------------------------------
def _plugin_kwargs(accelerator) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy

    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None and getattr(accelerator, "parallelism_config", None) is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    return {"mesh": mesh, "reshard_after_forward": getattr(plugin, "reshard_after_forward", True),
            "mp_policy": getattr(plugin, "mixed_precision_policy", None) or MixedPrecisionPolicy(),
            "offload_policy": getattr(plugin, "cpu_offload", None) or OffloadPolicy(),
            "layer_classes": names or None}


def prepare_with_accelerate(accelerator, model: nn.Module) -> nn.Module:
    """What accelerate's ``fsdp2_prepare_model`` does, for a subspace model: :func:`shard_model` with the plugin's
    settings (decoder layers from ``transformer_cls_names_to_wrap`` or ``_no_split_modules``, whatever
    ``auto_wrap_policy`` the plugin holds: the Trainer sets PEFT's, which accelerate's FSDP2 does not understand)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule) or isinstance(getattr(model, "_orig_mod", None), FSDPModule):
        return model
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "cpu_ram_efficient_loading", False):
        warnings.warn("fsdp_cpu_ram_efficient_loading is ignored for a subspace model: every rank holds the whole "
                      "model until it is sharded (c and P are built from the seed on every rank)", stacklevel=3)
    if getattr(plugin, "ignored_modules", None) is not None:
        from accelerate.utils.fsdp_utils import get_parameters_from_modules

        extra = get_parameters_from_modules(plugin.ignored_modules, model, accelerator.device)
    else:
        extra = set()
    kwargs = _plugin_kwargs(accelerator)
    if str(getattr(accelerator, "mixed_precision", "no")) != "no":
        # FSDP2 wants one dtype among the trainable parameters of a group: modules_to_save heads upcast (c is fp32)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32 and not is_dtensor(p):
                p.data = p.data.to(torch.float32)
    return shard_model(model, ignored_params=extra, **kwargs)


def install_accelerate_hook() -> bool:
    """Make ``accelerate``'s FSDP2 preparation hand models holding a subspace engine to
    :func:`prepare_with_accelerate` (once; every other model is prepared by accelerate as before). Returns whether
    the hook is in place."""
    try:
        import accelerate.accelerator as acc_mod
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return False
    current = getattr(acc_mod, "fsdp2_prepare_model", None)
    if current is None:  # pragma: no cover - another accelerate layout
        return False
    if getattr(current, "_hf_subspace", False):
        return True

    def fsdp2_prepare_model(accelerator, model, _orig=current):
        if find_engine(model) is not None:
            return prepare_with_accelerate(accelerator, model)
        return _orig(accelerator, model)

    fsdp2_prepare_model._hf_subspace = True
    fsdp2_prepare_model.__wrapped__ = current
    fsdp2_prepare_model.__doc__ = current.__doc__
    acc_mod.fsdp2_prepare_model = fsdp2_prepare_model
    return True

