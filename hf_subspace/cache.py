"""Knowing, on the host and without reading a tensor back from the device, whether a value computed from ``c``,
``λ`` and θ0 is still valid.

A materialized ``θ0 + δ`` (the inference cache) or a cached flat ``P c`` is valid while none of its inputs changed.
Comparing values (``torch.equal``) would cost a device→host sync per check; these tokens cost none:

* in-place updates through autograd-visible ops bump a tensor's version counter (``t._version``);
* fused optimizers (``AdamW(fused=True)``, the Trainer's default on CPU) update parameters without bumping it, but
  every ``torch.optim.Optimizer.step`` runs the global step hooks: :data:`OPTIMIZER_STEPS` counts them;
* ``t.data`` hands out an alias with a version counter of its own (``p.data.mul_(5)`` moves nothing), so every
  parameter the engine reads (c, λ and each θ0 held as a plain ``nn.Parameter``) is given the class
  :class:`TrackedParameter`, whose ``.data`` counts its reads and writes: any ``.data`` access conservatively
  invalidates what was computed from it.
* replacing a tensor's storage (``.data = ...``, ``Module._apply``) changes its ``data_ptr``.

Not seen: writes through an alias taken before the value was cached (``d = p.data`` kept and written later), or
through raw storage/numpy/dlpack views. Those are as invisible to autograd's own saved-tensor checks.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

#: [number of optimizer steps taken in this process]: bumped by a global ``Optimizer`` step post-hook
OPTIMIZER_STEPS = [0]


def _count_step(optimizer, args, kwargs) -> None:
    OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


class TrackedParameter(nn.Parameter):
    """An ``nn.Parameter`` whose ``.data`` (read or assigned) bumps ``_data_epoch``: a ``.data`` alias may be
    written without moving the version counter, so each one handed out invalidates cached values."""

    @property
    def data(self):
        self.__dict__["_data_epoch"] = self.__dict__.get("_data_epoch", 0) + 1
        return nn.Parameter.data.__get__(self)

    @data.setter
    def data(self, value):
        self.__dict__["_data_epoch"] = self.__dict__.get("_data_epoch", 0) + 1
        nn.Parameter.data.__set__(self, value)

    def __repr__(self):
        return "Parameter containing:\n" + torch.Tensor.__repr__(torch.Tensor._make_subclass(
            torch.Tensor, nn.Parameter.data.__get__(self), self.requires_grad))

    def __deepcopy__(self, memo):  # Parameter.__deepcopy__ reads .data only to clone it: not a possible write
        if id(self) not in memo:
            memo[id(self)] = type(self)(nn.Parameter.data.__get__(self).clone(memory_format=torch.preserve_format),
                                        self.requires_grad)
        return memo[id(self)]

    def __reduce_ex__(self, proto):  # pickles (torch.save, deepcopy by pickling) as a plain Parameter
        return nn.Parameter.__reduce_ex__(self, proto)


def track(p: torch.Tensor) -> torch.Tensor:
    """Give a plain ``nn.Parameter`` the class :class:`TrackedParameter` (in place; other tensors are left as
    they are and tracked by version, storage and optimizer steps only). Returns ``p``."""
    if type(p) is nn.Parameter:
        p.__class__ = TrackedParameter
    return p


def untrack(p: torch.Tensor) -> torch.Tensor:
    """Undo :func:`track` (when the engine lets go of a parameter of the user's model)."""
    if type(p) is TrackedParameter:
        p.__class__ = nn.Parameter
        p.__dict__.pop("_data_epoch", None)
    return p


def token(t: torch.Tensor | None) -> tuple:
    """What must not change for a value computed from ``t`` to stay valid (host-side only: no sync)."""
    if t is None:
        return ()
    # an inference tensor (made under torch.inference_mode, e.g. c loaded there) has no version counter; it cannot
    # be written in place outside inference mode, so its identity and storage stand for its value
    version = -1 if t.is_inference() else t._version
    return (id(t), t.data_ptr(), t.dtype, t.device, version, t.__dict__.get("_data_epoch", 0))


def values_token(tensors) -> tuple:
    """:func:`token` of several tensors, plus the optimizer steps taken (fused optimizers bump no version)."""
    return (OPTIMIZER_STEPS[0],) + tuple(token(t) for t in tensors)


def theta0_token(t: torch.Tensor) -> tuple:
    """What must not change for a materialized θ0 + δ to stay valid: the tensor, its storage (``.data =`` and
    ``Module._apply`` swap it without a version bump), dtype, device, version (in-place updates) and ``.data``
    accesses (an alias written in place moves no version). A θ0 that a whole-module move replaced by a new plain
    Parameter is tracked again here."""
    return token(track(t))


class InferenceCacheMixin:
    """The inference cache of :class:`~hf_subspace.engine.SubspaceEngine`: materialized ``θ0 + δ`` kept while
    nothing needs their gradient, validated on the host (no sync per forward)."""

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


    def _drop_cache(self) -> None:
        """Forget the materialized tensors and what they were checked against, but not the state of the forward
        in progress (``in_forward``, ``training_forward``): dropping mid-forward must not end it."""
        for key in ("cache", "cache_key", "checked_in_forward"):
            self.scratch.__dict__.pop(key, None)

