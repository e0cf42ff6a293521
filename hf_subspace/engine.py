"""The engine: the trainable vectors of every adapter, and ``θ0 + δ`` for each tensor of θ.

Each concern has one home; :class:`SubspaceEngine` puts them together:

* here — adapter state (``c``, ``λ``, active / enabled), building adapters, the forward path (``apply_delta``,
  ``rows_delta``), the model's forward hooks, device moves (``_apply``) and requires_grad bookkeeping at build;
* :mod:`hf_subspace.delta` — one adapter's ``P c``: per tensor on the fly (hashing, fastfood: row slices, no
  flat ``P c``) or the flat ``P c`` cached for the step (the other kinds);
* :mod:`hf_subspace.cache` — the inference cache (materialized ``θ0 + δ`` while nothing needs their gradient) and
  the host-side validity tokens it and the flat ``P c`` are checked with: no device sync per forward;
* :mod:`hf_subspace.recompute` — no adapted weight kept from the forward to the backward: saved-tensor hooks and
  the bit-for-bit recompute (autocast's casts included), refusing a θ0 changed in between;
* :mod:`hf_subspace.embedding` / :mod:`hf_subspace.blocked` — embeddings' per-token rows and huge linears' row
  blocks; :mod:`hf_subspace.products` — the autograd products of P (autocast off);
* :mod:`hf_subspace.merging` — merge / unmerge, removing the parametrizations, restoring requires_grad;
* :mod:`hf_subspace.dtensor` — reading FSDP2's shards of θ0; :mod:`hf_subspace.validation` — whether d fits θ.

Each tensor of θ carries one :class:`~hf_subspace.layer.SubspaceLayer` (a ``torch.nn.utils.parametrize``
parametrization and a peft ``BaseTunerLayer``), so every read of ``module.weight`` inside the module's forward
returns ``θ0 + Σ_active λ_i P_i c``: non-reentrant activation checkpointing recomputes it correctly, and code that
reads a weight directly (tied heads, ``cls_token``) sees the adapted value. The layers hold the engine by a plain
strong reference (not a submodule): a base model taken out of its PeftModel keeps its adapter, and
``copy.deepcopy`` copies the engine once, with the model that uses it. ``c``, ``λ`` and the projection arithmetic
stay float32, whatever ``model.to(dtype)`` does; the delta is cast to each weight's dtype.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .blocked import output_heads, use_blocked_path_if_huge_linear
from .cache import InferenceCacheMixin, theta0_token, track
from .delta import AdapterSubspace, Scratch
from .dtensor import adapted_shard, is_dtensor
from .embedding import use_row_path_if_embedding
from . import quantized
from .layer import SubspaceLayer
from .layout import ThetaLayout, holder_names, original_tensor
from .merging import MergeMixin, is_subspace_parametrized  # noqa: F401  (importable from here as before)
from .projections import Projection, make_projection
from .recompute import SavedWeightsMixin
from .validation import validate_dim_fits


class SubspaceEngine(SavedWeightsMixin, InferenceCacheMixin, MergeMixin, nn.Module):
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
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists")
        validate_dim_fits(dim, mode, layout, what=f"the {len(layout.slots)} tensors of its layout")
        n_scales = len(layout.slots) if mode == "said" else 0
        d_c = dim - n_scales
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

        heads = output_heads(model)

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
                        use_blocked_path_if_huge_linear(module, attr, slot.numel,
                                                        head=id(module) in heads or len(slot.holders) > 1)
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
        if type(original) is not torch.Tensor and is_dtensor(original):
            # FSDP2's sharded θ0 read outside its module's forward: this rank's shard of θ0 + δ (hf_subspace.fsdp)
            return adapted_shard(self, slot_name, original, live)
        cache = self._inference_cache(live, original)
        if cache is not None:
            hit = cache.get(slot_name)
            if hit is not None and hit[0] == theta0_token(original):
                return hit[1]  # host-side check only (no sync): see hf_subspace.cache
        out = original
        for name, state, i in live:
            out = out + state.piece(self.coeffs[name], i, self._scale(name, i)).to(original.device, original.dtype)
        if cache is not None:
            cache[slot_name] = (theta0_token(original), out)
        elif getattr(self.scratch, "saved", None) is not None and self.needs_grad(live, original):
            self._register_saved(slot_name, original, live, out)
        return out

    def rows_delta(self, slot_name: str, rows: torch.Tensor) -> torch.Tensor | None:
        """Rows ``rows`` of the summed active delta of one tensor (float32), or None when nothing applies."""
        total = None
        for name, state, i in self._live(slot_name):
            part = state.rows(self.coeffs[name], i, rows, self._scale(name, i))
            total = part if total is None else total + part
        return total

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


#: the engine's state-dict keys up to hf_subspace 0.2.0: ``coeffs.<adapter>`` / ``scales.<adapter>`` (ParameterDicts)
_LEGACY_VECTOR_KEY = re.compile(r"^(coeffs|scales)\.([^.]+)$")


def vector_key(field: str, adapter: str) -> str:
    """The engine's state-dict key of ``field`` (``"coeffs"`` or ``"scales"``) of ``adapter``."""
    return f"vectors.{adapter}.{field}"


def current_vector_key(key: str) -> "str | None":
    """The current engine key for a key saved by hf_subspace <= 0.2.0 (``coeffs.<adapter>``), else None. The one place
    where old names of c and λ are mapped: the engine's ``load_state_dict`` applies it to every key it is given."""
    m = _LEGACY_VECTOR_KEY.match(key)
    return vector_key(m.group(1), m.group(2)) if m else None


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
