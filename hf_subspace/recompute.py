"""Recomputing adapted weights in the backward instead of keeping them from the forward (a mixin of the engine).

While the wrapped model's forward runs, ``torch.autograd.graph`` saved-tensor hooks store each adapted weight a
layer saves for its backward — or autocast's low-precision cast of it, or a view of either — as a reference to θ0
and the d numbers of c (and λ) the forward used, and the backward recomputes ``θ0 + δ`` (cast again, viewed
again) when it needs it, one tensor at a time, bit for bit. Hooks the user entered around the forward
(``save_on_cpu``) still see every other tensor. A θ0 changed between the forward and the backward is refused.
"""
from __future__ import annotations

import sys
import weakref

import torch

from .cache import theta0_token


class SavedWeightsMixin:
    """The saved-tensor hooks of :class:`~hf_subspace.engine.SubspaceEngine` (state in ``self.scratch``)."""

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
        entry = (weakref.ref(out), slot_name, original, tuple(terms), theta0_token(original))
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
    now = theta0_token(packed.original)
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


