"""``SubspaceLayer``: the per-tensor tuner layer of the subspace method.

Unlike LoRA's layers it wraps no module: it is the ``torch.nn.utils.parametrize`` parametrization put on each
tensor of θ (``module.parametrizations.<attr>[0]``), mapping ``θ0 -> θ0 + Σ_active λ_i P_i c``. It is also a
peft ``BaseTunerLayer``, so ``disable_adapter()``, ``get_model_status()``, ``get_layer_status()`` and per-layer
``merge()`` / ``unmerge()`` work as they do for LoRA. All state (c, λ, active adapters, enabled, merged pairs)
lives in the :class:`~hf_subspace.engine.SubspaceEngine` the layer holds by a strong, non-submodule reference,
so every layer reports the same state and the layer itself has no parameters (nothing extra is saved).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge


class SubspaceLayer(nn.Module, BaseTunerLayer):
    """The parametrization of one tensor of θ (``slot_name``), backed by ``engine``."""

    is_subspace_layer = True
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, engine, slot_name: str):
        nn.Module.__init__(self)
        object.__setattr__(self, "_engine", engine)  # a strong reference, not a submodule
        self.slot_name = slot_name

    @property
    def engine(self):
        return self._engine

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self._engine.apply_delta(self.slot_name, original)

    # -- BaseTunerLayer state, read from the engine -----------------------------------------------------------
    @property
    def active_adapter(self) -> list[str]:
        return list(self._engine.active)

    @property
    def disable_adapters(self) -> bool:
        return not self._engine.enabled or self.slot_name in self._engine.disabled_slots

    @property
    def merged_adapters(self) -> list[str]:
        return [n for n in self._engine.adapters if (n, self.slot_name) in self._engine.merged_slots]

    def _get_available_adapters(self) -> set[str]:
        return {n for n, st in self._engine.adapters.items() if self.slot_name in st.layout.index}

    def _all_available_adapter_names(self) -> list[str]:
        return sorted(self._get_available_adapters())

    def enable_adapters(self, enabled: bool) -> None:
        """Enable or disable the adapters on this tensor alone (peft's per-layer state); ``model.disable_adapter()``
        calls it on every layer. A disabled tensor reads θ0: a delta merged into it is unmerged first, as LoRA's
        layers unmerge when disabled."""
        engine = self._engine
        if enabled:
            engine.enabled = True
            engine.disabled_slots.discard(self.slot_name)
        else:
            if any(slot == self.slot_name for _, slot in engine.merged_slots):
                engine.unmerge(slots={self.slot_name})
            engine.disabled_slots.add(self.slot_name)
        _freeze_while_disabled(engine)
        engine.invalidate()

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        self._engine.set_active([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        names = check_adapters_to_merge(self, adapter_names)  # peft's warnings for what is already merged
        names = [n for n in names if n in self._get_available_adapters()]
        if names:
            self._engine.merge(names, slots={self.slot_name}, safe=safe_merge)

    def unmerge(self) -> None:
        self._engine.unmerge(slots={self.slot_name})

    def delete_adapter(self, adapter_name: str) -> None:
        pass  # adapters live in the engine; the tuner deletes them there

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        pass  # the trainable vectors live in the engine; the tuner sets them there

    # -- the shape of the layer this tensor belongs to (peft's tuner layers expose it) --------------------------
    def _holder(self):
        holders = self._engine.holders.get(self.slot_name)
        return holders[0] if holders else (None, None)

    def _in_out_features(self) -> tuple[Optional[int], Optional[int]]:
        """``(in_features, out_features)`` of the module holding this tensor, as peft reads them for its own layers
        (Linear, Conv*d, Embedding, transformers' Conv1D, MultiheadAttention); for any other module, the tensor's
        own shape: ``(shape[1], shape[0])`` for a matrix or kernel, ``(n, n)`` for a vector (a bias or a norm's
        scale), ``(None, None)`` for a scalar."""
        module, attr = self._holder()
        if module is None:
            return None, None
        if isinstance(module, nn.MultiheadAttention):
            return module.embed_dim, 3 * module.embed_dim
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                               nn.ConvTranspose3d)):
            return module.in_channels, module.out_channels
        if isinstance(module, nn.Embedding):
            return module.num_embeddings, module.embedding_dim
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            return module.in_features, module.out_features
        shape = tuple(module.parametrizations[attr].original.shape)
        if type(module).__name__ == "Conv1D" and len(shape) == 2:  # transformers' Conv1D stores (in, out)
            return shape[0], shape[1]
        if len(shape) >= 2:
            return shape[1], shape[0]
        if len(shape) == 1:
            return shape[0], shape[0]
        return None, None

    @property
    def in_features(self) -> Optional[int]:
        return self._in_out_features()[0]

    @property
    def out_features(self) -> Optional[int]:
        return self._in_out_features()[1]

    # a parametrization has no base layer: keep BaseTunerLayer's weight/bias properties from recursing
    @property
    def weight(self):
        raise AttributeError("a SubspaceLayer holds no weight; read it from the module it parametrizes")

    @property
    def bias(self):
        raise AttributeError("a SubspaceLayer holds no bias; read it from the module it parametrizes")

    def extra_repr(self) -> str:
        return f"slot={self.slot_name!r}, adapters={sorted(self._get_available_adapters())}"


def _freeze_while_disabled(engine) -> None:
    """peft's layers stop training their adapters while disabled (``enable_adapters(False)`` turns their
    ``requires_grad`` off) and train the active ones again when enabled. c and λ are shared by every tensor of an
    adapter's θ: they are frozen while every one of those tensors is disabled, and when one is enabled again an
    active adapter gets back the ``requires_grad`` it had (or that ``set_adapter`` gave it meanwhile), an inactive
    one stays frozen, as peft's layers do."""
    frozen = engine.__dict__.setdefault("_frozen_while_disabled", {})
    for name in [n for n in frozen if n not in engine.adapters]:
        del frozen[name]
    for name, state in engine.adapters.items():
        disabled = not engine.enabled or all(s.name in engine.disabled_slots for s in state.layout.slots)
        params = [engine.coeffs[name]] + ([engine.scales[name]] if name in engine.scales else [])
        if disabled and name not in frozen:
            frozen[name] = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(False)
        elif not disabled and name in frozen:
            for p, before in zip(params, frozen.pop(name)):  # (or set_adapter made it trainable meanwhile)
                p.requires_grad_((before or p.requires_grad) and name in engine.active)


def sole_subspace_layer(module: nn.Module, attr: str = "weight") -> "SubspaceLayer | None":
    """The subspace layer of ``module.<attr>`` when it is that tensor's only parametrization, else None."""
    plist = module.parametrizations[attr]
    layers = [p for p in plist if getattr(p, "is_subspace_layer", False)]
    return layers[0] if len(plist) == 1 and layers else None


def override_forward(module: nn.Module, plain: type, forward) -> None:
    """Give ``module``'s parametrized class ``forward`` if the class before parametrization uses ``plain.forward``.

    ``register_parametrization`` gives each module its own subclass, so the override touches this module alone
    and disappears with the parametrization; subclasses with a ``forward`` of their own keep it.
    """
    base = type(module).__mro__[1]  # the class before parametrization
    if base.forward is plain.forward:
        type(module).forward = forward
