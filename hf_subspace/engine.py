"""The engine: the trainable vectors of every adapter, and ``θ0 + δ`` for each tensor of θ.

* Each tensor of θ carries one :class:`~hf_subspace.tuner.layer.SubspaceLayer` (a ``torch.nn.utils.parametrize``
  parametrization and a peft ``BaseTunerLayer``), so every read of ``module.weight`` *inside the module's
  forward* returns ``θ0 + Σ_active λ_i P_i c``. Because the sum is computed where the weight is read,
  non-reentrant activation checkpointing recomputes it correctly, and code that reads a weight directly (tied
  heads, ``cls_token`` parameters) sees the adapted value too.
* The layers hold the engine by a plain strong reference (not a submodule): a base model taken out of its
  PeftModel keeps its adapter, and ``copy.deepcopy`` copies the engine once, with the model that uses it.
* Projections with cheap row slices (hashing, fastfood) compute each tensor's delta on the fly (one gather forward, one
  scatter backward); the others cache the flat ``P c`` until ``c`` changes and run ``Pᵀ g`` once per backward.
* Without autograd (evaluation, ``generate``) each adapted tensor is kept materialized until ``c``, the active
  adapters or θ0 change, so inference costs what the plain model costs (set ``inference_cache = False`` to trade
  that speed for the memory of one copy of θ during evaluation).
* With autograd, no adapted tensor stays materialized from the forward to the backward: while the wrapped model's
  forward runs, ``torch.autograd.graph`` saved-tensor hooks store a layer's adapted weight as a reference to θ0
  and the d numbers of c, and the backward recomputes ``θ0 + δ`` when it needs it (one tensor at a time). Other
  saved-tensor hooks the user has entered (``save_on_cpu``) still see every other tensor. Set
  ``recompute_saved_weights = False`` to keep the materialized weights instead (one copy of θ more, no recompute).
  A huge plain ``nn.Linear`` in θ (a tied LM head) goes further: it is used and differentiated a block of rows at a
  time, so neither its adapted weight nor its weight gradient ever exists whole (:mod:`hf_subspace.blocked`).
* ``c``, ``λ`` and the projection arithmetic stay float32, whatever ``model.to(dtype)`` does; the delta is cast
  to each weight's dtype.
"""
from __future__ import annotations

import re
import sys
import weakref
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .cache import token, track, untrack, values_token
from .delta import AdapterSubspace, Scratch
from . import quantized
from .errors import SubspaceConfigError
from .layout import ThetaLayout, holder_names, original_tensor
from .projections import Projection


class SubspaceEngine(nn.Module):
    """Owns the trainable vectors of every adapter and puts ``θ0 + δ`` into the model's weights.

    Parameters (float32): ``coeffs[name]`` is ``c`` (shape ``(d_c,)``), ``scales[name]`` the SAID scales (shape
    ``(m,)``, SAID mode only). Both live in ``vectors[name]`` (an :class:`AdapterVectors`), so their parameter
    names are ``vectors.<adapter>.coeffs`` and ``vectors.<adapter>.scales``: the adapter name sits between dots,
    where PEFT's convention (``lora_A.<adapter>.weight``) puts it and where code that matches ``".<adapter>."``
    looks for it (TRL copies ``".default."`` parameters into its ``"ref"`` adapter). ``coeffs`` and ``scales``
    are dict-like views of that one container. State: ``active`` adapters, ``enabled`` (every tensor),
    ``disabled_slots`` (tensors disabled one by one: peft's per-layer ``enable_adapters(False)``), and
    ``merged_slots`` — the ``(adapter, tensor)`` pairs whose delta has been added into θ0.
    """

    def __init__(self):
        super().__init__()
        self.vectors = nn.ModuleDict()
        self.coeffs = _VectorView(self.vectors, "coeffs")
        self.scales = _VectorView(self.vectors, "scales")
        self.adapters: dict[str, AdapterSubspace] = {}
        self.active: list[str] = []
        self.enabled = True
        #: tensors whose layer was disabled on its own (``layer.enable_adapters(False)``): they read θ0 alone
        self.disabled_slots: set[str] = set()
        self.merged_slots: set[tuple[str, str]] = set()
        #: every (module, attribute) holding each tensor of θ, by slot name (plain references, not submodules)
        self.holders: dict[str, list[tuple[nn.Module, str]]] = {}
        #: ``requires_grad`` of every parameter before the first adapter froze the base (restored on unload)
        self.base_requires_grad: dict[str, bool] | None = None
        #: plain ``nn.Embedding`` layers add the delta to the rows a batch reads instead of the whole table
        self.row_path_embeddings = True
        #: keep adapted tensors materialized while nothing needs their gradient (see the module docstring)
        self.inference_cache = True
        #: recompute adapted weights in the backward instead of keeping them from the forward (module docstring)
        self.recompute_saved_weights = True
        #: huge plain ``nn.Linear`` weights (a tied LM head) are used a block of rows at a time (hf_subspace.blocked)
        self.blocked_linears = True
        self.scratch = Scratch()

    # -- building ---------------------------------------------------------------------------------------------
    def record_base(self, model: nn.Module) -> None:
        """Remember which parameters were trainable before any adapter (once, at the first adapter)."""
        if self.base_requires_grad is None:
            self.base_requires_grad = {n: bool(p.requires_grad) for n, (_, _, p) in holder_names(model).items()}

    def was_trainable(self, name: str, p: torch.Tensor) -> bool:
        if self.base_requires_grad is None:
            return bool(p.requires_grad)
        return self.base_requires_grad.get(name, bool(p.requires_grad))

    def add_adapter(self, model: nn.Module, name: str, layout: ThetaLayout, dim: int,
                    projection: "str | Projection" = "hashing", mode: str = "global", seed: int = 0,
                    projection_options: dict | None = None) -> AdapterSubspace:
        """Reparameterize ``model``'s tensors in ``layout`` for adapter ``name``; returns its state."""
        from .projections import make_projection
        from .tuner.layer import SubspaceLayer

        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        n_scales = len(layout.slots) if mode == "said" else 0
        d_c = dim - n_scales
        if d_c <= 0:
            raise SubspaceConfigError(
                f"SAID mode spends one of the dim={dim} trainable numbers on each of the {n_scales} tensors of θ, "
                f"leaving none for c; use dim > {n_scales} or mode='global'"
            )
        if dim > layout.D:
            raise SubspaceConfigError(f"dim={dim} is larger than the number of weights in θ (D={layout.D})")
        self.record_base(model)
        first = original_tensor(model, layout.slots[0])
        device = first.device
        proj_device = torch.device("cpu") if device.type == "meta" else device
        if isinstance(projection, Projection):
            if (projection.D, projection.d) != (layout.D, d_c):
                raise ValueError(
                    f"the given {projection.kind} projection maps R^{projection.d} -> R^{projection.D}, but this "
                    f"model's θ needs R^{d_c} -> R^{layout.D}"
                )
            proj = projection.to(proj_device)
        else:
            proj = make_projection(projection, layout.D, d_c, seed=seed, device=proj_device,
                                   **(projection_options or {}))
        state = AdapterSubspace(layout, proj, mode)
        self.coeffs[name] = track(nn.Parameter(torch.zeros(d_c, device=device, dtype=torch.float32)))
        if n_scales:
            self.scales[name] = track(nn.Parameter(torch.ones(n_scales, device=device, dtype=torch.float32)))
        self.adapters[name] = state
        from peft.utils.integrations import _skip_init_on_device

        from .blocked import use_blocked_path_if_huge_linear
        from .embedding import use_row_path_if_embedding

        # peft's low_cpu_mem_usage builds adapters under init_empty_weights, which would move every weight that
        # register_parametrization re-registers to the meta device: θ0 stays where it is
        with _skip_init_on_device():
            for slot in layout.slots:
                holders = self.holders.setdefault(slot.name, [])
                for module_name, attr in slot.holders:
                    module = model.get_submodule(module_name)
                    if slot.quantized:  # no parametrization: the layer's forward adds δ (hf_subspace.quantized)
                        quantized.attach(self, module, slot.name)
                        if not any(m is module and a == attr for m, a in holders):
                            holders.append((module, attr))
                        continue
                    if not is_subspace_parametrized(module, attr):
                        parametrize.register_parametrization(module, attr, SubspaceLayer(self, slot.name),
                                                             unsafe=True)
                        use_row_path_if_embedding(module, attr)
                        use_blocked_path_if_huge_linear(module, attr, slot.numel)
                    if not any(m is module and a == attr for m, a in holders):
                        holders.append((module, attr))
                    track(module.parametrizations[attr].original).requires_grad_(False)
        if any(slot.quantized for slot in layout.slots) or any(quantized.bnb_kind(m) for m in model.modules()):
            quantized.keep_layers_differentiable(model)
        if not self.active:
            self.active = [name]
        self.hook_into(model)
        return state

    def original(self, slot_name: str) -> torch.Tensor:
        """θ0 of one tensor of θ (the parametrization's stored tensor)."""
        module, attr = self.holders[slot_name][0]
        if quantized.attached_layer(module) is not None and attr == "weight":
            return module.weight  # a bitsandbytes quantized weight (its layer's forward adds δ)
        return module.parametrizations[attr].original

    # -- the forward path -------------------------------------------------------------------------------------
    def _live(self, slot_name: str) -> list[tuple[str, AdapterSubspace, int]]:
        """The active, unmerged adapters that cover ``slot_name``: ``(name, state, index in its layout)``."""
        out = []
        if not self.enabled or slot_name in self.disabled_slots:
            return out
        for name in self.active:
            state = self.adapters.get(name)
            i = state.layout.index.get(slot_name) if state is not None else None
            if i is not None and (name, slot_name) not in self.merged_slots:
                out.append((name, state, i))
        return out

    def _scale(self, name: str, i: int) -> torch.Tensor | None:
        return self.scales[name][i] if name in self.scales else None

    def needs_grad(self, live, original: torch.Tensor) -> bool:
        """Whether autograd must see the delta (otherwise the materialized tensor may be cached)."""
        if not torch.is_grad_enabled():
            return False
        return original.requires_grad or any(
            self.coeffs[n].requires_grad or (n in self.scales and self.scales[n].requires_grad) for n, _, _ in live)

    def apply_delta(self, slot_name: str, original: torch.Tensor) -> torch.Tensor:
        """``θ0 + Σ λ_i P_i c`` for one tensor, over the active unmerged adapters."""
        live = self._live(slot_name)
        if not live:
            return original
        cache = self._inference_cache(live, original)
        if cache is not None:
            hit = cache.get(slot_name)
            if hit is not None and hit[0] == _identity(original):
                return hit[1]  # host-side check only (no sync): see hf_subspace.cache
        out = original
        for name, state, i in live:
            out = out + state.piece(self.coeffs[name], i, self._scale(name, i)).to(original.device, original.dtype)
        if cache is not None:
            cache[slot_name] = (_identity(original), out)
        elif getattr(self.scratch, "saved", None) is not None and self.needs_grad(live, original):
            self._register_saved(slot_name, original, live, out)
        return out

    # -- recomputing adapted weights in the backward ------------------------------------------------------------
    def _register_saved(self, slot_name: str, original: torch.Tensor, live, out: torch.Tensor) -> None:
        """Remember how to recompute ``out`` (θ0 + δ of ``slot_name``) if autograd saves it in this forward."""
        s = self.scratch
        terms = []
        for name, state, i in live:
            if name not in s.snapshots:  # c and λ as this forward used them: d numbers, once per forward
                lam = self.scales[name].detach().clone() if name in self.scales else None
                s.snapshots[name] = (self.coeffs[name].detach().clone(), lam)
            c, lam = s.snapshots[name]
            # kinds that cache the flat P c keep it for the step anyway: point at their piece instead of recomputing
            view = None if state.projection.supports_row_slices else state.scratch.pieces[i].detach()
            terms.append((name, state, i, c, None if lam is None else lam[i], view))
        entry = (weakref.ref(out), slot_name, original, tuple(terms), _identity(original))
        s.saved[out.untyped_storage().data_ptr()] = entry
        if out.grad_fn is not None:  # autocast's low-precision copy of ``out`` is found through its grad_fn
            s.saved_fns[id(out.grad_fn)] = entry

    def _recompute(self, slot_name: str, original: torch.Tensor, terms) -> torch.Tensor:
        """``θ0 + δ`` of one tensor again, bit for bit as the forward computed it.

        A backward that builds a graph (``create_graph=True``: Hessian-vector products) gets it through the live
        ``c`` and ``λ``; an ordinary backward gets a plain tensor from the values the forward used.
        """
        out = original
        if torch.is_grad_enabled():
            for name, state, i, c, lam, _ in terms:
                # the values the forward used, with the graph of the live parameters (c may have changed since)
                live_c = self.coeffs[name]
                src_c = c + (live_c - live_c.detach())
                src_lam = None if lam is None else lam + (self._scale(name, i) - self._scale(name, i).detach())
                out = out + state.piece(src_c, i, src_lam).to(original.device, original.dtype)
            return out
        for name, state, i, c, lam, view in terms:
            piece = state.piece(c, i, lam) if view is None else (view if lam is None else view * lam)
            out = out + piece.to(original.device, original.dtype)
        return out

    def _pack_saved(self, t: torch.Tensor):
        s = self.scratch
        saved = s.saved
        if saved and isinstance(t, torch.Tensor) and t.layout == torch.strided:
            key = t.untyped_storage().data_ptr()
            hit = saved.get(key)
            if hit is not None:
                ref, slot_name, original, terms, ident = hit
                w = ref()
                if w is not None and w.untyped_storage().data_ptr() == key and w.dtype == t.dtype:
                    return _SavedWeight(slot_name, original, terms, t.size(), t.stride(), t.storage_offset(), ident,
                                        None)
            if t.dtype != torch.float32 or t._base is not None:
                # under autocast a matmul saves its cast of the weight (or a view of it): ``ToCopyBackward0`` of
                # an adapted weight. It is recomputed as the same cast of the same float32 value: bit for bit.
                base = t if t._base is None else t._base
                fn = base.grad_fn if s.saved_fns else None
                if fn is not None and type(fn).__name__ == "ToCopyBackward0":
                    src = fn.next_functions[0][0]
                    hit = s.saved_fns.get(id(src)) if src is not None else None
                    w = None if hit is None else hit[0]()
                    if (w is not None and w.grad_fn is src and base.shape == w.shape and base.is_contiguous()
                            and w.is_contiguous()):
                        _, slot_name, original, terms, ident = hit
                        return _SavedWeight(slot_name, original, terms, t.size(), t.stride(), t.storage_offset(),
                                            ident, t.dtype)
        outer = s.outer_hooks
        return t if outer is None else _OuterSaved(outer[1], outer[0](t))

    def _unpack_saved(self, packed):
        if isinstance(packed, _SavedWeight):
            _check_unchanged(packed)
            w = self._recompute(packed.slot_name, packed.original, packed.terms)
            if packed.cast is not None:
                w = w.to(packed.cast)
            return w.as_strided(packed.size, packed.stride, packed.offset)
        if isinstance(packed, _OuterSaved):
            return packed.unpack(packed.value)
        return packed

    def _enter_saved_hooks(self) -> None:
        s = self.scratch
        if torch.compiler.is_compiling():
            return  # a compiled graph keeps what AOT autograd decides; no Python hooks (nor frames) in the trace
        if getattr(s, "saved_depth", 0) and not _frame_is_running(getattr(s, "owner_frame", None)):
            self._reset_saved_hooks()  # the forward that entered them was interrupted (KeyboardInterrupt, ...)
        s.saved_depth = getattr(s, "saved_depth", 0) + 1
        if s.saved_depth > 1:
            return  # a nested forward of the same model: the outer one's hooks are in place
        s.owner_frame = _calling_module_frame()
        if (not self.recompute_saved_weights or not torch.is_grad_enabled() or torch.compiler.is_compiling()
                or not torch._C._autograd._saved_tensors_hooks_is_enabled()):
            s.saved = None
            return
        s.outer_hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        s.saved, s.saved_fns, s.snapshots = {}, {}, {}
        torch._C._autograd._push_saved_tensors_default_hooks(self._pack_saved, self._unpack_saved)
        s.pushed = True

    def _exit_saved_hooks(self) -> None:
        s = self.scratch
        if torch.compiler.is_compiling():
            return
        s.saved_depth = max(0, getattr(s, "saved_depth", 1) - 1)
        if s.saved_depth:
            return
        if getattr(s, "pushed", False):
            torch._C._autograd._pop_saved_tensors_default_hooks()
        s.pushed, s.saved, s.saved_fns, s.snapshots, s.outer_hooks, s.owner_frame = False, None, None, None, None, None

    def _reset_saved_hooks(self) -> None:
        """Undo what an interrupted forward left: torch runs ``always_call`` forward hooks on ``Exception`` only,
        so a ``KeyboardInterrupt`` mid-forward skips :meth:`_forward_finished`."""
        s = self.scratch
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if getattr(s, "pushed", False) and top is not None and top[0] == self._pack_saved:
            torch._C._autograd._pop_saved_tensors_default_hooks()
        s.saved_depth, s.in_forward, s.training_forward = 0, False, False
        s.pushed, s.saved, s.saved_fns, s.snapshots, s.outer_hooks, s.owner_frame = False, None, None, None, None, None

    def rows_delta(self, slot_name: str, rows: torch.Tensor) -> torch.Tensor | None:
        """Rows ``rows`` of the summed active delta of one tensor (float32), or None when nothing applies."""
        total = None
        for name, state, i in self._live(slot_name):
            part = state.rows(self.coeffs[name], i, rows, self._scale(name, i))
            total = part if total is None else total + part
        return total

    def wants_whole_tensor(self, slot_name: str, original: torch.Tensor) -> bool:
        """True when ``slot_name`` is best read whole (its materialized value may be cached): no autograd."""
        live = self._live(slot_name)
        return bool(live) and self._inference_cache(live, original) is not None

    def _inference_cache(self, live, original: torch.Tensor) -> dict | None:
        """The cache of materialized tensors when it applies (no autograd through the delta), else None.

        It is emptied whenever the values of an active ``c`` / ``λ``, the active adapters, the merged pairs or the
        inference mode change, and dropped as soon as a forward needs gradients again.
        """
        s = self.scratch
        # a forward of a model in training mode never caches: reentrant activation checkpointing runs the layers
        # under no_grad, and keeping their weights would hold a copy of θ through the step
        if (not self.inference_cache or torch.compiler.is_compiling() or getattr(s, "training_forward", False)
                or self.needs_grad(live, original)):
            if getattr(s, "cache", None):
                self._drop_cache()
            return None
        if getattr(s, "checked_in_forward", False):
            return s.cache  # already checked in this forward of the model: c cannot change during it
        values = [t for n in self.active for t in (self.coeffs[n], self.scales[n] if n in self.scales else None)]
        # host-side only (versions, storage, .data accesses, optimizer steps: hf_subspace.cache): no sync
        key = (tuple(self.active), frozenset(self.merged_slots), torch.is_inference_mode_enabled(),
               values_token(values))
        if getattr(s, "cache_key", None) != key:
            s.cache, s.cache_key = {}, key
        s.checked_in_forward = getattr(s, "in_forward", False)
        return s.cache

    def _forward_started(self, module, args) -> None:
        """Forward pre-hook on the wrapped model: the cache is checked once per forward, not once per tensor."""
        self._enter_saved_hooks()  # first: it may reset what an interrupted forward left
        self.scratch.in_forward, self.scratch.checked_in_forward = True, False
        self.scratch.training_forward = module.training

    def _forward_finished(self, module, args, output) -> None:
        self._exit_saved_hooks()
        self.scratch.in_forward, self.scratch.checked_in_forward = False, False
        self.scratch.training_forward = False

    def hook_into(self, model: nn.Module) -> None:
        """Register the forward hooks above on ``model`` (once)."""
        if not any(getattr(h, "__self__", None) is self for h in model._forward_pre_hooks.values()):
            model.register_forward_pre_hook(self._forward_started)
            model.register_forward_hook(self._forward_finished, always_call=True)

    def unhook(self, model: nn.Module) -> None:
        for hooks in (model._forward_pre_hooks, model._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)

    def slot_delta(self, name: str, i: int) -> torch.Tensor:
        """``λ_i P_i c`` for tensor ``i`` of adapter ``name`` (float32, no autograd)."""
        with torch.no_grad():
            return self.adapters[name].piece(self.coeffs[name], i, self._scale(name, i))

    def unmerged_original(self, slot_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the stored θ0 of ``slot_name``) minus every delta merged into it: the base weights as loaded."""
        merged = [n for n, slot in self.merged_slots if slot == slot_name]
        if not merged:
            return tensor
        out = tensor.detach().float().clone()
        for name in merged:
            out -= self.slot_delta(name, self.adapters[name].layout.index[slot_name]).to(out.device)
        return out

    # -- merging and removal ----------------------------------------------------------------------------------
    @property
    def merged_adapters(self) -> list[str]:
        """Adapters whose every tensor is merged into θ0."""
        return [n for n, st in self.adapters.items()
                if all((n, s.name) in self.merged_slots for s in st.layout.slots)]

    @torch.no_grad()
    def merge(self, names: Sequence[str], slots: set[str] | None = None, safe: bool = False) -> None:
        """Add the deltas of ``names`` into θ0 (only the tensors in ``slots``, if given); merged pairs are skipped."""
        for name in names:
            state = self.adapters[name]
            todo = [(i, s) for i, s in enumerate(state.layout.slots)
                    if (slots is None or s.name in slots) and (name, s.name) not in self.merged_slots]
            self.refuse_quantized_merge(name, [s for _, s in todo])
            deltas = [(s, self.slot_delta(name, i)) for i, s in todo]
            if safe and not all(torch.isfinite(d).all() for _, d in deltas):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            for slot, delta in deltas:
                original = self.original(slot.name)
                original.add_(delta.to(original.device, original.dtype))
                self.merged_slots.add((name, slot.name))
        self.invalidate()

    def refuse_quantized_merge(self, name: str, slots) -> None:
        """Merging δ into a quantized weight would requantize it (lossy: the merged model is not the trained one)."""
        q = [s.name for s in slots if s.quantized]
        if q:
            shown = ", ".join(repr(n) for n in q[:3]) + (f" and {len(q) - 3} more" if len(q) > 3 else "")
            raise ValueError(
                f"cannot merge adapter {name!r} into {len(q)} quantized weight(s) ({shown}): adding δ to a 4-bit or "
                "8-bit weight means requantizing it, which loses most of δ (the merged model would not be the one "
                "trained). To ship a merged model, dequantize the base first and merge into floats: "
                "`base.dequantize()` (transformers; or load the base in bf16/fp32), then "
                "`PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()`; or keep the quantized base and "
                "the adapter (a few KB) unmerged")

    @torch.no_grad()
    def unmerge(self, slots: set[str] | None = None) -> None:
        """Subtract every merged delta (only for the tensors in ``slots``, if given) back out of θ0."""
        for name, slot_name in sorted(self.merged_slots):
            if slots is not None and slot_name not in slots:
                continue
            state = self.adapters[name]
            original = self.original(slot_name)
            delta = self.slot_delta(name, state.layout.index[slot_name])
            original.sub_(delta.to(original.device, original.dtype))
            self.merged_slots.discard((name, slot_name))
        self.invalidate()

    def remove_parametrizations(self, model: nn.Module) -> None:
        """Take every subspace parametrization off ``model``, leaving the (possibly merged) θ0 in place."""
        for module in list(model.modules()):
            layer = quantized.attached_layer(module)
            if layer is not None and getattr(layer, "_engine", None) is self:
                quantized.detach(module)
            if not parametrize.is_parametrized(module):
                continue
            for attr in list(module.parametrizations.keys()):
                if is_subspace_parametrized(module, attr):
                    original = untrack(module.parametrizations[attr].original)
                    _own_parametrized_class(module)
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                    # remove_parametrizations re-registers the very same Parameter object, so ties survive
                    assert getattr(module, attr) is original
        self.holders.clear()
        self.disabled_slots.clear()
        self.unhook(model)

    def restore_requires_grad(self, model: nn.Module) -> None:
        """Give every parameter the ``requires_grad`` it had before the first adapter (what unload returns)."""
        for name, (_, _, p) in holder_names(model).items():
            if p.is_floating_point() or p.is_complex():
                p.requires_grad_(self.was_trainable(name, p) if self.base_requires_grad is not None else True)

    def delete_adapter(self, model: nn.Module, name: str) -> None:
        if any(a == name for a, _ in self.merged_slots):
            raise ValueError(f"Cannot delete adapter(s) {[name]} while they are merged. Please unmerge them first.")
        del self.adapters[name]
        del self.vectors[name]
        self.active = [a for a in self.active if a != name]
        if not self.active and self.adapters:
            self.active = [sorted(self.adapters)[0]]  # as peft's layers do: the first remaining name, sorted
        if not self.adapters:
            self.remove_parametrizations(model)
        self.invalidate()

    def set_active(self, names: Sequence[str]) -> None:
        for n in names:
            if n not in self.adapters:
                raise ValueError(f"unknown adapter {n!r}; have {sorted(self.adapters)}")
        self.active = list(names)
        self.invalidate()

    def _drop_cache(self) -> None:
        """Forget the materialized tensors and what they were checked against, but not the state of the forward
        in progress (``in_forward``, ``training_forward``): dropping mid-forward must not end it."""
        for key in ("cache", "cache_key", "checked_in_forward"):
            self.scratch.__dict__.pop(key, None)

    def invalidate(self) -> None:
        self._drop_cache()
        for state in self.adapters.values():
            state.invalidate()

    def named_vectors(self):
        """``(adapter, parameter)`` for every trainable vector (c, then λ) of every adapter."""
        for adapter, vectors in self.vectors.items():
            for p in vectors.parameters():
                yield adapter, p

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            current = current_vector_key(key[len(prefix):])
            if current is not None:
                state_dict[prefix + current] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        """``model.to(device)`` moves c and λ; dtype casts (``.half()``, ``.to(torch.bfloat16)``) leave them float32;
        ``to_empty()`` after the meta device starts them again at c = 0, λ = 1."""
        was_meta = any(p.is_meta for p in self.parameters())

        def keep_dtype(t):
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                return t.to(out.device)
            return out

        out = super()._apply(keep_dtype, recurse)
        for p in (*self.coeffs.values(), *self.scales.values()):
            track(p)
        if was_meta and not any(p.is_meta for p in self.parameters()):
            with torch.no_grad():
                for p in self.coeffs.values():
                    p.zero_()
                for p in self.scales.values():
                    p.fill_(1.0)
        self.invalidate()
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {st.projection.kind} d={st.projection.d} D={st.layout.D} {st.mode}"
                         for n, st in self.adapters.items())


class AdapterVectors(nn.Module):
    """The trainable vectors of one adapter: ``coeffs`` (c) and, in SAID mode only, ``scales`` (λ)."""


class _VectorView:
    """``engine.coeffs`` / ``engine.scales``: one field of every adapter's :class:`AdapterVectors`, as a dict keyed by
    adapter name (``view[name] = nn.Parameter(...)``, ``del view[name]``, ``name in view``, ``values()``)."""

    def __init__(self, vectors: nn.ModuleDict, field: str):
        self._vectors, self._field = vectors, field

    def __getitem__(self, name: str) -> nn.Parameter:
        p = self._vectors[name]._parameters.get(self._field) if name in self._vectors else None
        if p is None:
            raise KeyError(name)
        return p

    def __setitem__(self, name: str, p: nn.Parameter) -> None:
        if name not in self._vectors:
            self._vectors[name] = AdapterVectors()
        self._vectors[name].register_parameter(self._field, p)

    def __delitem__(self, name: str) -> None:
        self[name]  # KeyError for an unknown name
        del self._vectors[name]._parameters[self._field]
        if not self._vectors[name]._parameters:
            del self._vectors[name]

    def __contains__(self, name) -> bool:
        return name in self._vectors and self._vectors[name]._parameters.get(self._field) is not None

    def keys(self) -> list[str]:
        return [n for n in self._vectors if n in self]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def values(self) -> list[nn.Parameter]:
        return [self[n] for n in self.keys()]

    def items(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, self[n]) for n in self.keys()]


#: the engine's state-dict keys up to hf_subspace 0.2: ``coeffs.<adapter>`` / ``scales.<adapter>`` (ParameterDicts)
_LEGACY_VECTOR_KEY = re.compile(r"^(coeffs|scales)\.([^.]+)$")


def vector_key(field: str, adapter: str) -> str:
    """The engine's state-dict key of ``field`` (``"coeffs"`` or ``"scales"``) of ``adapter``."""
    return f"vectors.{adapter}.{field}"


def current_vector_key(key: str) -> "str | None":
    """The current engine key for a key saved by hf_subspace <= 0.2 (``coeffs.<adapter>``), else None. The one place
    where old names of c and λ are mapped: the engine's ``load_state_dict`` applies it to every key it is given."""
    m = _LEGACY_VECTOR_KEY.match(key)
    return vector_key(m.group(1), m.group(2)) if m else None


def _calling_module_frame():
    """The frame of the ``Module.__call__`` running the forward whose pre-hook called us (alive until it returns)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name not in ("_call_impl", "_wrapped_call_impl"):
        frame = frame.f_back
    return frame


def _frame_is_running(frame) -> bool:
    """Whether ``frame`` is on this thread's stack (a forward that entered the hooks and has not returned)."""
    if frame is None:
        return False
    current = sys._getframe(1)
    while current is not None:
        if current is frame:
            return True
        current = current.f_back
    return False


class _SavedWeight:
    """What autograd keeps of an adapted weight between forward and backward: θ0 (alive anyway), the d numbers the
    forward used, and the saved view's geometry — not the ``D``-sized tensor."""

    __slots__ = ("slot_name", "original", "terms", "size", "stride", "offset", "ident", "cast")

    def __init__(self, slot_name, original, terms, size, stride, offset, ident, cast):
        self.slot_name, self.original, self.terms = slot_name, original, terms
        self.size, self.stride, self.offset = size, stride, offset
        self.ident, self.cast = ident, cast  # θ0's identity at the forward; the dtype autocast cast the weight to


def _check_unchanged(packed: _SavedWeight) -> None:
    """Refuse to recompute ``θ0 + δ`` from a θ0 changed since the forward (autograd refuses a modified saved
    tensor the same way). Changed: an in-place update (version), or a ``.data`` alias handed out while the storage
    stayed the same (``p.data.mul_(5)``). A new storage with the same values (ZeRO-3 / FSDP gathering a
    parameter again) is legitimate and recomputed from."""
    now = _identity(packed.original)
    (_, ptr0, dtype0, dev0, version0, epoch0), (_, ptr1, dtype1, dev1, version1, epoch1) = packed.ident, now
    if version1 != version0 or (epoch1 != epoch0 and ptr1 == ptr0) or (dtype1, dev1) != (dtype0, dev0):
        raise RuntimeError(
            f"θ0 of {packed.slot_name!r} was modified between the forward and the backward (in place, or through "
            "`.data`); the backward recomputes θ0 + δ from θ0 and would use the new values. Change base weights "
            "only after backward(), or set engine.recompute_saved_weights = False to keep adapted weights instead")


class _OuterSaved:
    """A tensor packed by saved-tensor hooks the user entered around ours (e.g. ``save_on_cpu``)."""

    __slots__ = ("unpack", "value")

    def __init__(self, unpack, value):
        self.unpack, self.value = unpack, value


def _identity(t: torch.Tensor) -> tuple:
    """What must not change for a materialized θ0 + δ to stay valid: the tensor, its storage (``.data =`` and
    ``Module._apply`` swap it without a version bump), dtype, device, version (in-place updates) and ``.data``
    accesses (an alias written in place moves no version: :mod:`hf_subspace.cache`). A θ0 that a whole-module move
    replaced by a new plain Parameter is tracked again here."""
    return token(track(t))


def is_subspace_parametrized(module: nn.Module, attr: str) -> bool:
    return parametrize.is_parametrized(module, attr) and any(
        getattr(p, "is_subspace_layer", False) for p in module.parametrizations[attr])


def _own_parametrized_class(module: nn.Module) -> None:
    """Give ``module`` a private copy of torch's injected ``Parametrized*`` class before a parametrization is removed.

    ``register_parametrization`` makes one class per module, but ``copy.deepcopy`` shares it between the original
    and the copy; removing a parametrization deletes its property from the class, which would break the other.
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def find_engine(model: nn.Module) -> "SubspaceEngine | None":
    """The :class:`SubspaceEngine` of ``model`` (a PEFT subspace model, a reparameterized model or the base model
    inside either), or None."""
    for module in model.modules():
        if isinstance(module, SubspaceEngine):
            return module
        engine = getattr(module, "_engine", None)
        if isinstance(engine, SubspaceEngine) and getattr(module, "is_subspace_layer", False):
            return engine
    return None
