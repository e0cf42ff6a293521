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
    return (id(t), t.data_ptr(), t.dtype, t.device, t._version, t.__dict__.get("_data_epoch", 0))


def values_token(tensors) -> tuple:
    """:func:`token` of several tensors, plus the optimizer steps taken (fused optimizers bump no version)."""
    return (OPTIMIZER_STEPS[0],) + tuple(token(t) for t in tensors)
