"""Merging deltas into θ0, undoing it, and taking the parametrizations off (a mixin of the engine)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import quantized
from .cache import untrack
from .layout import holder_names


class MergeMixin:
    """Merge / unmerge / removal for :class:`~hf_subspace.engine.SubspaceEngine`."""

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
                quantized.detach(module)  # bitsandbytes' own forward again
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


